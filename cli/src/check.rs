//! `capsid check`: the host report as a table or JSON.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use capsid_sandbox::check::{HostReport, KvmFlavor, PoolReport};
use capsid_sandbox::config::Config;

/// Arguments of `capsid check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the report; exits non-zero with the reason when no backend is usable.
pub fn run(config: Option<&Path>, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let report = HostReport::gather(&config);
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    match report.selection.backend {
        Some(_) => Ok(ExitCode::SUCCESS),
        None => {
            eprintln!("capsid: no usable backend: {}", report.selection.reason);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn yes_no(v: bool) -> &'static str {
    if v {
        "yes"
    } else {
        "no"
    }
}

fn found(p: Option<&Path>) -> String {
    p.map_or_else(|| "not found".to_string(), |p| p.display().to_string())
}

/// What the selected backend means for isolation: plain words for TCG,
/// which capsid may have chosen without the user asking for it.
fn isolation(r: &HostReport) -> String {
    match (r.selection.backend, &r.selection.isolation_warning) {
        (None, _) => "-".to_string(),
        (Some(_), Some(warning)) => format!("WARNING: {warning} (docs/security.md)"),
        (Some(_), None) => "hardware-assisted KVM".to_string(),
    }
}

fn table(r: &HostReport) -> String {
    let kvm = match (&r.kvm.error, r.kvm.api_version) {
        (Some(e), _) => e.clone(),
        (None, Some(v)) => format!("/dev/kvm, API version {v}"),
        (None, None) => "unusable".to_string(),
    };
    let flavor = match r.kvm.flavor {
        KvmFlavor::Hardware => format!(
            "hardware-assisted ({}{})",
            r.kvm.cpu_virt.as_deref().unwrap_or("?"),
            match r.kvm.tdp {
                Some(true) => ", EPT/NPT",
                Some(false) => ", no EPT/NPT",
                None => "",
            }
        ),
        KvmFlavor::Pvm => "PVM (software; standard guest kernels cannot run)".to_string(),
        KvmFlavor::Unknown => "unknown (no vmx/svm visible)".to_string(),
    };
    let caps = if r.kvm.api_version.is_none() {
        "-".to_string()
    } else if r.kvm.missing_caps.is_empty() {
        "all present".to_string()
    } else {
        format!("missing {}", r.kvm.missing_caps.join(", "))
    };
    let qemu = r.qemu.as_ref().map_or_else(
        || "not found".to_string(),
        |q| {
            format!(
                "{} ({}; microvm: {}, vhost-user: {})",
                q.path.display(),
                q.version,
                yes_no(q.microvm),
                yes_no(q.vhost_user)
            )
        },
    );
    let asset = |a: &capsid_sandbox::check::Asset| {
        format!(
            "{} ({})",
            a.path.display(),
            if a.present { "present" } else { "missing" }
        )
    };
    let backend = r.selection.backend.map_or("none", |b| b.as_str());
    let coordinator = match &r.balloon_coordinator {
        None => "- (memory.enabled is false)".to_string(),
        Some(c) if c.running => "running".to_string(),
        Some(c) => match &c.error {
            Some(e) => format!("unknown: {e}"),
            None => "NOT running: memory.enabled is true but nothing reclaims guest memory; \
                     start capsid-balloond (docs/memory.md)"
                .to_string(),
        },
    };
    let rows = [
        ("KVM", kvm),
        ("KVM kind", flavor),
        ("KVM capabilities", caps),
        ("/dev/net/tun", yes_no(r.tun).to_string()),
        ("/dev/vhost-vsock", yes_no(r.vhost_vsock).to_string()),
        ("/dev/vhost-net", yes_no(r.vhost_net).to_string()),
        ("QEMU", qemu),
        ("capsid-vmm", found(r.capsid_vmm.as_deref())),
        ("capsid-vhost", found(r.capsid_vhost.as_deref())),
        (
            "virtiofsd",
            match &r.virtiofsd {
                Some((path, version)) => format!("{version} ({})", path.display()),
                None => "not found: containers with volumes cannot run (make deps)".into(),
            },
        ),
        (
            "containerd",
            r.containerd.clone().unwrap_or_else(|| "not found".into()),
        ),
        ("jail", r.jail.summary()),
        ("kernel", asset(&r.assets.kernel)),
        ("bzImage", asset(&r.assets.bzimage)),
        ("initramfs", asset(&r.assets.initramfs)),
        ("backend", format!("{backend}: {}", r.selection.reason)),
        ("isolation", isolation(r)),
        ("balloon coordinator", coordinator),
    ];
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(pool_rows(&r.pool))
        .collect();
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// The `pool` line, then one line per shape the daemon reported.
fn pool_rows(p: &PoolReport) -> Vec<(String, String)> {
    let daemon = match (p.enabled, p.daemon_running, &p.error) {
        (_, _, Some(e)) => format!("capsid-poold unknown: {e}"),
        (false, false, None) => "- (pool.enabled is false: every container boots cold)".into(),
        (false, true, None) => "capsid-poold running, but pool.enabled is false here: no \
                                container takes a pooled sandbox"
            .into(),
        (true, true, None) => "capsid-poold running".into(),
        (true, false, None) => "capsid-poold NOT running: containers boot cold; start \
                                capsid-poold (docs/pool.md)"
            .into(),
    };
    let mut rows = vec![("pool".to_string(), daemon)];
    for s in &p.shapes {
        let mut line = format!(
            "{} of {} ready, {} booting (key {})",
            s.ready, s.size, s.booting, s.key
        );
        if let Some(failure) = &s.last_failure {
            line.push_str(&format!("; last failure: {failure}"));
        }
        rows.push((
            format!(
                "pool {} vCPU{}, {} MiB",
                s.vcpus,
                if s.vcpus == 1 { "" } else { "s" },
                s.memory_mib
            ),
            line,
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use capsid_sandbox::check::{
        select_backend, Asset, AssetsReport, BackendFacts, KvmReport, QemuReport, TCG_WARNING,
    };
    use capsid_sandbox::config::BackendKind;

    use super::*;

    fn report(flavor: KvmFlavor, forced: Option<BackendKind>) -> HostReport {
        let kvm = KvmReport {
            present: true,
            api_version: Some(12),
            missing_caps: vec![],
            flavor,
            cpu_virt: None,
            tdp: None,
            error: None,
        };
        let qemu = QemuReport {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            version: "QEMU emulator version 7.2.0".into(),
            microvm: true,
            vhost_user: true,
        };
        let facts = BackendFacts {
            kvm: &kvm,
            qemu: Some(&qemu),
            capsid_vmm: true,
            capsid_vhost: true,
        };
        let selection = select_backend(&facts, forced);
        let asset = |p: &str| Asset {
            path: PathBuf::from(p),
            present: true,
        };
        HostReport {
            kvm: kvm.clone(),
            tun: true,
            vhost_vsock: false,
            vhost_net: false,
            qemu: Some(qemu.clone()),
            capsid_vmm: Some(PathBuf::from("/usr/bin/capsid-vmm")),
            capsid_vhost: Some(PathBuf::from("/usr/bin/capsid-vhost")),
            virtiofsd: None,
            containerd: None,
            jail: capsid_sandbox::check::JailReport {
                enabled: true,
                jailer: Some(PathBuf::from("/usr/bin/capsid-jail")),
                uids: (2_000_000_000, 2_000_065_535),
                clashing_users: vec![],
            },
            assets: AssetsReport {
                kernel: asset("/k"),
                bzimage: asset("/b"),
                initramfs: asset("/i"),
            },
            selection,
            balloon_coordinator: None,
            pool: PoolReport::default(),
        }
    }

    fn row(table: &str, name: &str) -> String {
        table
            .lines()
            .find(|l| l.split("  ").next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{table}"))
            .to_string()
    }

    #[test]
    fn tcg_is_said_plainly() {
        // PVM: TCG chosen without being asked for.
        let text = table(&report(KvmFlavor::Pvm, None));
        assert!(
            row(&text, "backend").contains("qemu-tcg: KVM is PVM"),
            "{text}"
        );
        let isolation = row(&text, "isolation");
        assert!(
            isolation.ends_with(&format!("WARNING: {TCG_WARNING} (docs/security.md)")),
            "{text}"
        );
        assert!(isolation.contains("not a security boundary"), "{text}");
        // Forced by the config on a host that has KVM: said all the same.
        let text = table(&report(KvmFlavor::Hardware, Some(BackendKind::QemuTcg)));
        assert!(row(&text, "isolation").contains(TCG_WARNING), "{text}");
    }

    #[test]
    fn the_pool_says_whether_containers_boot_cold() {
        let mut r = report(KvmFlavor::Hardware, None);
        assert!(
            row(&table(&r), "pool").ends_with("pool.enabled is false: every container boots cold)")
        );
        r.pool.enabled = true;
        let text = table(&r);
        assert!(
            row(&text, "pool").contains("capsid-poold NOT running: containers boot cold"),
            "{text}"
        );
        r.pool.daemon_running = true;
        r.pool.shapes = vec![capsid_sandbox::pool_daemon::ShapeStatus {
            vcpus: 2,
            memory_mib: 512,
            size: 3,
            key: "0123456789abcdef".into(),
            ready: 1,
            booting: 1,
            last_failure: Some("exited with status 1 before it was ready".into()),
        }];
        let text = table(&r);
        assert!(
            row(&text, "pool").ends_with("  capsid-poold running"),
            "{text}"
        );
        assert_eq!(
            row(&text, "pool 2 vCPUs, 512 MiB")
                .trim_start_matches("pool 2 vCPUs, 512 MiB")
                .trim_start(),
            "1 of 3 ready, 1 booting (key 0123456789abcdef); last failure: exited with \
             status 1 before it was ready",
            "{text}"
        );
    }

    #[test]
    fn kvm_backends_carry_no_warning() {
        let text = table(&report(KvmFlavor::Hardware, None));
        assert!(row(&text, "backend").contains("capsid-vmm"), "{text}");
        assert!(
            row(&text, "isolation").ends_with("  hardware-assisted KVM"),
            "{text}"
        );
        assert!(!text.contains("WARNING"), "{text}");
    }
}
