//! Running CNI plugins (CNI spec 1.0.0, "Execution protocol"): the
//! `CNI_*` environment, the configuration on stdin, the result or error
//! reply on stdout; and whole chains, ADD in order and DEL in reverse
//! ("Execution of Network Configurations").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use serde_json::{Map, Value};

use super::conflist::{plugin_config, plugin_type, ConfList};
use super::result::{CniResult, ErrorReply};
use super::{CniError, Result};

/// How long one plugin call may take (they take milliseconds; a hung one
/// must not hang `capsid run`).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What identifies one attachment to the plugins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the network namespace's path.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the interface name inside it.
    pub ifname: String,
}

/// Finds and runs plugins from a list of directories.
#[derive(Debug, Clone)]
pub struct Plugins {
    dirs: Vec<PathBuf>,
}

impl Plugins {
    /// Plugins looked up in `dirs`, in order.
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self {
            dirs: dirs.to_vec(),
        }
    }

    /// The directories searched.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn cni_path(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The executable for plugin `ty`.
    pub fn find(&self, ty: &str) -> Result<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| is_executable(p))
            .ok_or_else(|| CniError::NoPlugin {
                plugin: ty.to_owned(),
                path: self.cni_path(),
            })
    }

    /// Checks every plugin of `list` exists, before anything is run.
    pub fn check(&self, list: &ConfList) -> Result<()> {
        for p in &list.plugins {
            self.find(plugin_type(p))?;
        }
        Ok(())
    }

    /// Runs one plugin; the parsed result for ADD, `None` otherwise.
    fn invoke(
        &self,
        command: &str,
        ty: &str,
        att: &Attachment,
        config: &Value,
    ) -> Result<Option<CniResult>> {
        let exe = self.find(ty)?;
        let stdin = serde_json::to_vec(config).map_err(|e| CniError::Config {
            what: format!("{ty} configuration"),
            reason: e.to_string(),
        })?;
        tracing::debug!(plugin = ty, command, container_id = %att.container_id, "running CNI plugin");
        let mut child = Command::new(&exe)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_PATH", self.cni_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CniError::Io {
                what: format!("running CNI plugin {}", exe.display()),
                source,
            })?;
        if let Some(mut input) = child.stdin.take() {
            // A plugin that exits without reading makes this fail: its exit
            // status and reply below say why.
            let _ = input.write_all(&stdin);
        }
        let out = wait_bounded(child, PLUGIN_TIMEOUT)
            .map_err(|source| CniError::Io {
                what: format!("waiting for CNI plugin {ty}"),
                source,
            })?
            .ok_or_else(|| CniError::Plugin {
                plugin: ty.to_owned(),
                command: command.to_owned(),
                reason: format!(
                    "did not finish within {} s (killed)",
                    PLUGIN_TIMEOUT.as_secs()
                ),
            })?;
        if !out.status.success() {
            let reason = serde_json::from_slice::<ErrorReply>(&out.stdout)
                .ok()
                .map(|e| e.message())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| {
                    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                    if stderr.is_empty() {
                        out.status.to_string()
                    } else {
                        stderr
                    }
                });
            return Err(CniError::Plugin {
                plugin: ty.to_owned(),
                command: command.to_owned(),
                reason,
            });
        }
        if command != "ADD" {
            return Ok(None);
        }
        CniResult::parse(&out.stdout)
            .map(Some)
            .map_err(|reason| CniError::Plugin {
                plugin: ty.to_owned(),
                command: command.to_owned(),
                reason: format!("unreadable result: {reason}"),
            })
    }

    /// ADD through the whole list; the last plugin's result. When a plugin
    /// fails, DEL runs through the whole list (as the spec asks) so nothing
    /// the earlier ones made is left, and the plugin's error is returned.
    pub fn add(
        &self,
        list: &ConfList,
        att: &Attachment,
        runtime: &Map<String, Value>,
    ) -> Result<CniResult> {
        self.check(list)?;
        let mut prev: Option<CniResult> = None;
        for plugin in &list.plugins {
            let config = plugin_config(list, plugin, runtime, prev.as_ref().map(|r| &r.raw));
            match self.invoke("ADD", plugin_type(plugin), att, &config) {
                Ok(Some(result)) => prev = Some(result),
                Ok(None) => {}
                Err(e) => {
                    if let Err(undo) = self.del(list, att, runtime, prev.as_ref()) {
                        tracing::warn!(error = %undo, "undoing a failed CNI ADD");
                    }
                    return Err(e);
                }
            }
        }
        prev.ok_or_else(|| CniError::Plugin {
            plugin: list.name.clone(),
            command: "ADD".into(),
            reason: "no result".into(),
        })
    }

    /// DEL through the list in reverse, with the ADD result as every
    /// plugin's `prevResult`. Every plugin runs even when one fails; the
    /// first error is returned.
    pub fn del(
        &self,
        list: &ConfList,
        att: &Attachment,
        runtime: &Map<String, Value>,
        added: Option<&CniResult>,
    ) -> Result<()> {
        let mut first_err = None;
        for plugin in list.plugins.iter().rev() {
            let config = plugin_config(list, plugin, runtime, added.map(|r| &r.raw));
            if let Err(e) = self.invoke("DEL", plugin_type(plugin), att, &config) {
                tracing::warn!(error = %e, "CNI DEL");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Waits for `child` and its output; kills it after `timeout` (`None`).
fn wait_bounded(child: Child, timeout: Duration) -> std::io::Result<Option<Output>> {
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map(Some),
        Err(_) => {
            // The child is not reaped until the waiter's wait returns, so
            // the pid is still the plugin's.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waiter.join();
            Ok(None)
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake plugin: a shell script that logs its command, environment
    /// and stdin, then replies as told.
    fn fake(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nin=$(cat)\necho \"$CNI_COMMAND {name} $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME $CNI_PATH $in\" >> {log}\n{body}\n",
                log = dir.join("log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn list(types: &[&str]) -> ConfList {
        ConfList {
            cni_version: "1.0.0".into(),
            name: "t".into(),
            plugins: types
                .iter()
                .map(|t| {
                    let mut m = Map::new();
                    m.insert("type".into(), Value::String((*t).into()));
                    m.insert(
                        "capabilities".into(),
                        serde_json::json!({"portMappings": *t == "b"}),
                    );
                    m
                })
                .collect(),
        }
    }

    fn att() -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
        }
    }

    const OK: &str = r#"echo '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}'"#;

    #[test]
    fn chain_runs_in_order_with_prev_result_and_env() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "a", OK);
        fake(dir.path(), "b", OK);
        let plugins = Plugins::new(&[dir.path().join("none"), dir.path().to_path_buf()]);
        let mut runtime = Map::new();
        runtime.insert("portMappings".into(), serde_json::json!([{"hostPort": 1}]));
        let r = plugins.add(&list(&["a", "b"]), &att(), &runtime).unwrap();
        assert_eq!(r.parsed.ips[0].address, "10.0.0.2/24");
        plugins
            .del(&list(&["a", "b"]), &att(), &runtime, Some(&r))
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(lines[0].starts_with("ADD a c1 /run/netns/x eth0 "), "{log}");
        assert!(
            lines[0].contains(&format!(":{} ", dir.path().display())),
            "{log}"
        );
        assert!(!lines[0].contains("runtimeConfig"), "{log}");
        assert!(lines[1].starts_with("ADD b "), "{log}");
        assert!(
            lines[1].contains(r#""runtimeConfig":{"portMappings":[{"hostPort":1}]}"#),
            "{log}"
        );
        assert!(lines[1].contains(r#""prevResult":{"#), "{log}");
        assert!(lines[2].starts_with("DEL b "), "{log}");
        assert!(lines[3].starts_with("DEL a "), "{log}");
        assert!(lines[3].contains(r#""prevResult":{"#), "{log}");
    }

    #[test]
    fn failing_plugin_is_quoted_and_the_chain_undone() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "a", OK);
        fake(
            dir.path(),
            "b",
            r#"[ "$CNI_COMMAND" = ADD ] || exit 0; echo '{"code":11,"msg":"port in use","details":"bind: 8080"}'; exit 1"#,
        );
        let plugins = Plugins::new(&[dir.path().to_path_buf()]);
        let e = plugins
            .add(&list(&["a", "b"]), &att(), &Map::new())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI plugin b failed (ADD): port in use: bind: 8080"
        );
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        let cmds: Vec<String> = log
            .lines()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(cmds, ["ADD a", "ADD b", "DEL b", "DEL a"]);
    }

    #[test]
    fn stderr_is_the_reason_without_a_reply() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "a", "echo 'boom' >&2; exit 3");
        let plugins = Plugins::new(&[dir.path().to_path_buf()]);
        let e = plugins.add(&list(&["a"]), &att(), &Map::new()).unwrap_err();
        assert_eq!(e.to_string(), "CNI plugin a failed (ADD): boom");
    }

    #[test]
    fn hung_plugin_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "a", "exec sleep 60");
        let child = Command::new(dir.path().join("a"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_bounded(child, Duration::from_millis(200))
            .unwrap()
            .is_none());
        let child = Command::new("true").stdout(Stdio::piped()).spawn().unwrap();
        assert!(wait_bounded(child, Duration::from_secs(60))
            .unwrap()
            .is_some());
    }

    #[test]
    fn missing_plugin_is_named_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        fake(dir.path(), "a", OK);
        let plugins = Plugins::new(&[dir.path().to_path_buf()]);
        let e = plugins
            .add(&list(&["a", "nope"]), &att(), &Map::new())
            .unwrap_err();
        assert!(e.to_string().contains("\"nope\""), "{e}");
        assert!(!dir.path().join("log").exists());
    }
}
