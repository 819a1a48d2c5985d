//! capsid-jail: starts one VM-side process confined (see the library's
//! documentation for the steps). Usage, as [`JailSpec::to_args`] writes it:
//! `capsid-jail --uid U --gid G --root DIR [--bind ro:PATH]... -- PROGRAM ARGS`.

mod jailer;

use std::process::ExitCode;

use capsid_jail::JailSpec;

fn main() -> ExitCode {
    // Nothing the jailer makes is for anyone else to read.
    // SAFETY: umask only sets this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let spec = match JailSpec::parse(&args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match jailer::run(&spec) {
        // `run` returns only on failure: the child execs, the parent exits
        // as the child did.
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("capsid-jail: {}", jailer::describe(&e));
            ExitCode::from(1)
        }
    }
}
