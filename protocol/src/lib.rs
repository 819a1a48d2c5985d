//! The capsid agent API (package `capsid.agent.v1`), generated from
//! `protos/agent.proto`: the one definition of the wire shared by the host
//! side (sandbox crate) and the guest agent.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations)]

/// Protobuf messages of the agent API.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unused,
    nonstandard_style,
    missing_docs
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server stubs of the agent API.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unused,
    nonstandard_style,
    missing_docs
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The vsock port on the host that the agent connects to when it is ready.
pub const AGENT_HOST_PORT: u32 = 1024;

/// The guest CID of the host, per the vsock specification.
pub const VSOCK_HOST_CID: u32 = 2;

#[cfg(test)]
mod tests {
    use super::agent::{CreateContainerRequest, Rootfs, Stdio};
    use protobuf::Message;

    #[test]
    fn create_request_round_trips() {
        let mut req = CreateContainerRequest::new();
        req.container_id = "c1".into();
        req.oci_spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        let mut rootfs = Rootfs::new();
        rootfs.readonly = true;
        req.rootfs = protobuf::MessageField::some(rootfs);
        let mut stdio = Stdio::new();
        stdio.stdout_port = 2001;
        stdio.terminal = true;
        req.stdio = protobuf::MessageField::some(stdio);

        let bytes = req.write_to_bytes().unwrap();
        let back = CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        assert!(back.rootfs.readonly);
        assert_eq!(back.stdio.stdout_port, 2001);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let junk = [0xff_u8, 0xff, 0xff, 0xff, 0x0f, 0x12];
        assert!(CreateContainerRequest::parse_from_bytes(&junk).is_err());
    }
}
