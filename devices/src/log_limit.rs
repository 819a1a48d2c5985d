//! Warnings a guest can cause are bounded: a hostile guest posting bad
//! descriptors in a loop makes the device warn on every request, and each
//! warning is a line in a host log file. This filter lets through at most
//! [`PER_SITE`] warnings and errors per call site per [`WINDOW`], and at
//! most [`TOTAL`] in the life of the process; what it drops is counted and
//! said once per window (on stderr, the process's log), and once for good
//! when the total is reached. Other levels pass untouched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Warnings per call site per window.
pub const PER_SITE: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Warnings in the life of the process.
pub const TOTAL: u64 = 2000;

#[derive(Debug)]
struct Site {
    since: Instant,
    passed: u32,
    dropped: u64,
}

/// The filter (a `tracing_subscriber` per-layer filter).
#[derive(Debug)]
pub struct GuestTriggeredLimit {
    sites: Mutex<HashMap<Identifier, Site>>,
    total: AtomicU64,
    per_site: u32,
    window: Duration,
    limit: u64,
}

impl Default for GuestTriggeredLimit {
    fn default() -> Self {
        Self::new(PER_SITE, WINDOW, TOTAL)
    }
}

impl GuestTriggeredLimit {
    /// A filter with these limits (tests use small ones).
    pub fn new(per_site: u32, window: Duration, total: u64) -> Self {
        Self {
            sites: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            per_site,
            window,
            limit: total,
        }
    }

    fn limited(meta: &Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= Level::WARN
    }

    fn admit(&self, meta: &Metadata<'_>) -> bool {
        let Ok(mut sites) = self.sites.lock() else {
            return false;
        };
        let now = Instant::now();
        let site = sites.entry(meta.callsite()).or_insert(Site {
            since: now,
            passed: 0,
            dropped: 0,
        });
        if now.duration_since(site.since) >= self.window {
            if site.dropped > 0 {
                eprintln!(
                    "capsid: {} more \"{}\" warnings were dropped in the last {:?}",
                    site.dropped,
                    meta.name(),
                    self.window
                );
            }
            *site = Site {
                since: now,
                passed: 0,
                dropped: 0,
            };
        }
        if site.passed >= self.per_site {
            site.dropped += 1;
            return false;
        }
        let total = self.total.fetch_add(1, Ordering::Relaxed);
        if total >= self.limit {
            if total == self.limit {
                eprintln!(
                    "capsid: {} warnings logged: further warnings are dropped",
                    self.limit
                );
            }
            return false;
        }
        site.passed += 1;
        true
    }
}

impl<S> Filter<S> for GuestTriggeredLimit {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        !Self::limited(meta) || self.admit(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::limited(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

/// Sets up logging for a binary that faces a guest: `CAPSID_LOG` (default
/// `warn`) to stderr, guest-triggered warnings bounded.
pub fn init_guest_facing_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let env = tracing_subscriber::EnvFilter::try_from_env("CAPSID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(GuestTriggeredLimit::default());
    tracing_subscriber::registry().with(env).with(layer).init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::Layer as _;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Buf) -> usize {
        String::from_utf8_lossy(&buf.0.lock().unwrap())
            .lines()
            .count()
    }

    #[test]
    fn a_flood_of_warnings_is_bounded_per_site_and_in_total() {
        let buf = Buf::default();
        let writer = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_filter(GuestTriggeredLimit::new(5, Duration::from_secs(3600), 8));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100_000 {
                tracing::warn!(i, "bad descriptor from the guest");
            }
            for i in 0..100 {
                tracing::info!(i, "ordinary");
            }
            for i in 0..100 {
                tracing::error!(i, "another site");
            }
        });
        // 5 from the first site, 3 more from the second (total 8), and
        // all 100 info lines.
        assert_eq!(lines(&buf), 5 + 3 + 100);
    }
}
