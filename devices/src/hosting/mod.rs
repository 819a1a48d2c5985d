//! Where device models run: behind vhost-user for QEMU (`vhost_user`), or
//! in-process under capsid-vmm's virtio-mmio transport.

pub mod mmio;
mod relay;
pub mod vhost_user;

// For the `vhost_user_relay` fuzz target only (fuzz/); not part of the API.
#[doc(hidden)]
pub use relay::fuzz_relay;
