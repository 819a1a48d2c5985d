//! Virtio device models and what they share (virtio 1.2, section 2).

pub mod rng;
