//! capsid's virtio device models.
//!
//! Each device's request logic is free of file descriptors and threads: it
//! takes a queue and guest memory, does the work, and reports what it did.
//! The same code is hosted in-process by capsid-vmm and served over
//! vhost-user to QEMU (`hosting`).

pub mod capped_log;
pub mod hosting;
pub mod log_limit;
pub mod passed_fd;
pub mod seccomp;
pub mod socket_claim;
pub mod virtio;

/// An error and its sources, as one line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}
