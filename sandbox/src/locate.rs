//! Finding capsid's binaries: beside the running executable first (a build
//! tree or an install prefix keeps them together), then in `PATH`.

use std::path::{Path, PathBuf};

/// Resolves `program`: a path with a slash is taken as it is; a bare name is
/// looked up beside the current executable, then in `PATH`.
pub fn binary(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(program)));
    let in_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside.into_iter().chain(in_path).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_in_path() {
        let sh = binary(Path::new("sh")).unwrap();
        assert!(sh.ends_with("sh"));
    }

    #[test]
    fn absolute_path_must_exist() {
        assert!(binary(Path::new("/bin/sh")).is_some());
        assert!(binary(Path::new("/nonexistent/capsid-vmm")).is_none());
        assert!(binary(Path::new("no-such-program-capsid")).is_none());
    }
}
