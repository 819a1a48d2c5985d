//! capsid's virtio device models.
//!
//! Each device's request logic is free of file descriptors and threads: it
//! takes a queue and guest memory, does the work, and reports what it did.
//! The same code is hosted in-process by capsid-vmm and served over
//! vhost-user to QEMU.

pub mod virtio;
