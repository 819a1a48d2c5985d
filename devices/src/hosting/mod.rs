//! Where device models run: behind vhost-user for QEMU (`vhost_user`), or
//! in-process under capsid-vmm's virtio-mmio transport.

pub mod mmio;
mod relay;
pub mod vhost_user;
