//! Measures rootfs preparation of a cached image: the first run converts the
//! image, then each iteration resolves, opens (index, manifest, config) and
//! prepares it again, which must be a cache hit.
//!
//! ```text
//! cargo run --release -p capsid-sandbox --example rootfs_cache_hit -- \
//!     [IMAGE (default: busybox)] [IMAGES_DIR (default: build/images)] [ITERATIONS]
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use capsid_sandbox::image::{self, RootfsCache};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("error: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                line.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let reference = args.next().unwrap_or_else(|| "busybox".into());
    let images_dir = PathBuf::from(args.next().unwrap_or_else(|| "build/images".into()));
    let iterations: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(200);
    let cache_dir = tempfile::tempdir()?;
    let cache = RootfsCache::new(cache_dir.path());

    let start = Instant::now();
    let source = image::resolve(&reference, &images_dir)?;
    let first = cache.prepare(&image::open(&source)?, &|m| println!("  {m}"))?;
    println!(
        "first run (conversion): {:.1} ms, {} disk {}",
        ms(start.elapsed()),
        first.fs_type,
        first.path.display()
    );
    drop(first);

    let mut whole = Vec::with_capacity(iterations);
    let mut prepare_only = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let source = image::resolve(&reference, &images_dir)?;
        let image = image::open(&source)?;
        let opened = Instant::now();
        let prepared = cache.prepare(&image, &|m| println!("  unexpected: {m}"))?;
        let done = Instant::now();
        if !prepared.cache_hit {
            return Err("a later run was not a cache hit".into());
        }
        whole.push(done - start);
        prepare_only.push(done - opened);
    }
    report("resolve + open + prepare", &mut whole);
    report("prepare (cache lookup and lease)", &mut prepare_only);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| {
        // Rounding an index into a short, non-empty list.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((samples.len() - 1) as f64 * q).round() as usize;
        ms(samples[i])
    };
    println!(
        "cache hit, {what}: median {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} runs)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    );
}
