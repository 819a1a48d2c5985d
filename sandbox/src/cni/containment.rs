//! Containment of guests on a `capsid run` network. A guest controls its
//! own kernel, so what it sends is checked outside the VM, in two places
//! (see docs/networking.md, "Containment"):
//!
//! * On the host, per network: [`HostFirewall`], an nftables table of
//!   capsid's own (`inet capsid-<bridge>`) whose `input` chain drops every
//!   packet arriving on the bundled bridge for the host itself (any of its
//!   addresses, IPv4 and IPv6, link-local included) unless it belongs to a
//!   connection the host made or a published port's connection. Forwarded
//!   traffic (outbound NAT, published ports, which portmap DNATs before the
//!   input hook) is not touched.
//!   Its other chain masquerades a guest's connection to a published port
//!   of another guest on the bridge (through a host address), whose replies
//!   could not cross the isolated bridge ports otherwise.
//! * In the sandbox's namespace, per sandbox: [`guard`], a classic BPF
//!   filter on the tap's ingress ahead of the redirect to the veth, which
//!   drops every frame whose source MAC, source address or ARP sender is
//!   not what the network gave the sandbox, before it reaches the veth.
//!
//! Why nftables for the host: a table of its own is made and removed in one
//! atomic `nft -f` transaction, covers IPv4 and IPv6 with one rule, and its
//! drop is final whatever other tables (iptables-nft, firewalld, the CNI
//! plugins' chains) accept, so nothing depends on rule order in chains
//! capsid shares with others. Why classic BPF on the tap: the filter must
//! run before the tc redirect takes the frame (a netfilter hook on the tap
//! comes after it), u32 cannot drop without the `gact` action (often not
//! built), and cls_bpf in direct-action mode runs a classic program (no
//! bpf() syscall, no compiler) that returns "drop" or "go on to the next
//! filter".

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use super::{CniError, Result};
use crate::netns::{Netns, NetnsError};
use crate::network::{GuestInterface, TapAttachment};

/// The nftables table of the bundled network on bridge `bridge`: the
/// host's side of containment. Per network, not per sandbox: made (or
/// replaced) before each ADD and removed once no sandbox is on the bridge,
/// both under the bridge's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFirewall {
    bridge: String,
    table: String,
}

impl HostFirewall {
    /// The table for `bridge`, whose name must be plain (letters, digits,
    /// `_`, `.`, `-`) to be written into nft's language as is.
    pub fn for_bridge(bridge: &str) -> Result<Self> {
        let plain = !bridge.is_empty()
            && bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !plain {
            return Err(CniError::Config {
                what: "network.bridge".into(),
                reason: format!("{bridge:?}: only letters, digits, '_', '.' and '-' are supported"),
            });
        }
        Ok(Self {
            bridge: bridge.to_owned(),
            table: format!("capsid-{bridge}"),
        })
    }

    /// The table's name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The table's definition. Besides the `input` drop, a masquerade for
    /// a guest's connection that the host DNATed (a published port, reached
    /// through one of the host's addresses) to another guest, or itself, on
    /// the bridge: the bridge's ports are isolated from each other
    /// ([`super::isolation::isolate_port`]), so the target's replies must
    /// go back through the host, which they do only when they are
    /// addressed to it.
    fn ruleset(&self) -> String {
        let (table, bridge) = (&self.table, &self.bridge);
        // (nft 1.0.6 wants a new line before each closing brace.)
        format!(
            "table inet {table} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{bridge}\" ct state established,related accept\n\
             \t\tiifname \"{bridge}\" counter drop comment \"guests open no connection to the host\"\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"{bridge}\" oifname \"{bridge}\" ct status dnat counter masquerade comment \"a guest reaches a published port of another through the host\"\n\
             \t}}\n\
             }}\n"
        )
    }

    /// Makes the table, or replaces it whole (one transaction: no moment
    /// without it for the sandboxes already on the network).
    pub fn ensure(&self) -> Result<()> {
        let table = &self.table;
        let script = format!(
            "add table inet {table}\ndelete table inet {table}\n{}",
            self.ruleset()
        );
        nft(&script, &format!("nft -f - (making table inet {table})"))?;
        tracing::debug!(table, bridge = %self.bridge, "host firewall in place");
        Ok(())
    }

    /// Removes the table; one that does not exist is no error.
    pub fn remove(&self) -> Result<()> {
        let table = &self.table;
        let removed = nft(
            &format!("add table inet {table}\ndelete table inet {table}\n"),
            &format!("nft -f - (removing table inet {table})"),
        );
        match removed {
            Ok(()) => {
                tracing::info!(table, bridge = %self.bridge, "host firewall removed");
                Ok(())
            }
            // Without nft no table was ever made (set-up fails first): a
            // failed set-up's teardown must not fail for it.
            Err(CniError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(table, "no nft on this host: no host firewall to remove");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs `nft -f -` with `script` on stdin.
fn nft(script: &str, what: &str) -> Result<()> {
    let io = |source| CniError::Io {
        what: format!("running {what} (is nftables installed?)"),
        source,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A failure to write shows in nft's status and message below.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(io)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(CniError::Firewall {
        command: what.to_owned(),
        reason: match stderr.lines().find(|l| !l.trim().is_empty()) {
            Some(first) => first.trim().to_owned(),
            None => out.status.to_string(),
        },
    })
}

/// The filter's priority on the tap's ingress: ahead of the redirect
/// (which gets the kernel's first automatic priority, 49152).
const GUARD_PRIO: &str = "1";

/// Adds the anti-spoofing filter to the tap of `tap`: see [`guard`].
/// [`crate::network::attach`] and [`crate::network::own::join_late`]
/// already did, before their redirect; this is for a tap wired otherwise.
pub fn guard_tap(tap: &TapAttachment) -> Result<()> {
    let Some(iface) = tap.guest.interfaces.first() else {
        return Err(CniError::Config {
            what: format!("network of tap {}", tap.tap),
            reason: "no interface to guard".into(),
        });
    };
    guard(&Netns::open(&tap.netns)?, &tap.tap, &tap.veth, iface)
}

/// Adds the anti-spoofing filter to the ingress of `tap` (whose ingress
/// qdisc must exist) in `ns`, from what the network gave interface `veth`
/// (`iface`, as read from it): frames from the guest pass on to the
/// redirect only with the veth's MAC as source, and with one of its
/// addresses as source (IPv4, ARP sender) or, for IPv6, one of its IPv6
/// addresses, the MAC's link-local address or `::` (duplicate address
/// detection); without any IPv6 address on the veth, no IPv6 at all.
/// Everything else (other EtherTypes, VLAN tags, short frames) is dropped.
/// Deleting the tap (or its ingress qdisc) removes the filter. Every tap a
/// sandbox is joined to a network with gets it, whoever made the network
/// (`capsid run`'s CNI, containerd's, Docker's).
pub(crate) fn guard(ns: &Netns, tap: &str, veth: &str, iface: &GuestInterface) -> Result<()> {
    let mac = parse_mac(&iface.mac).ok_or_else(|| CniError::Config {
        what: format!("MAC of {veth}"),
        reason: format!("{:?} is not a MAC address", iface.mac),
    })?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for prefix in &iface.addresses {
        match prefix.addr {
            IpAddr::V4(a) => v4.push(a),
            IpAddr::V6(a) => v6.push(a),
        }
    }
    if !v6.is_empty() {
        v6.push(link_local(mac));
        v6.push(Ipv6Addr::UNSPECIFIED);
    }
    let program = spoof_filter(mac, &v4, &v6);
    ns.tc(&[
        "filter",
        "add",
        "dev",
        tap,
        "parent",
        "ffff:",
        "prio",
        GUARD_PRIO,
        "protocol",
        "all",
        "bpf",
        "bytecode",
        &bytecode(&program),
        "da",
    ])
    .map_err(|e| match e {
        // The program itself (hundreds of characters) says nothing to a
        // reader of the error: name the filter instead.
        NetnsError::Command { netns, reason, .. } => CniError::Firewall {
            command: format!(
                "tc filter add dev {tap} parent ffff: prio {GUARD_PRIO} bpf … da (anti-spoofing, in {})",
                netns.display()
            ),
            reason,
        },
        e => e.into(),
    })?;
    tracing::info!(netns = %ns.path().display(), tap, veth, mac = %iface.mac, ipv4 = ?v4, ipv6 = ?v6, "anti-spoofing filter on the tap");
    Ok(())
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The EUI-64 link-local address Linux gives an interface with `mac`.
fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 0x02;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    Ipv6Addr::from(a)
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
/// `ld [k]`: a 32-bit word of the frame (network order), into A.
const LD_W: u16 = 0x20;
/// `ldh [k]`: a 16-bit half word of the frame.
const LD_H: u16 = 0x28;
/// `ld #len`: the frame's length.
const LD_LEN: u16 = 0x80;
/// `jeq #k, jt, jf`.
const JEQ: u16 = 0x15;
/// `jge #k, jt, jf`.
const JGE: u16 = 0x35;
/// `ja k`: unconditional jump (32-bit offset).
const JA: u16 = 0x05;
/// `ret #k`.
const RET: u16 = 0x06;
/// `ld vlan_avail`: ancillary load, 1 when the frame had a VLAN tag (which
/// the kernel takes off before tc sees the frame).
const VLAN_AVAIL: u32 = 0xffff_f000 + 48;

/// cls_bpf direct-action verdicts: `TC_ACT_SHOT` drops the frame;
/// `TC_ACT_UNSPEC` (-1) goes on to the next filter, the redirect.
const DROP: u32 = 2;
const PASS: u32 = u32::MAX;

// Offsets in an Ethernet frame (the program sees it from the MAC header).
const ETH_SRC: u32 = 6;
const ETH_TYPE: u32 = 12;
const ETH_HLEN: u32 = 14;
const ETHERTYPE_IPV4: u32 = 0x0800;
const ETHERTYPE_ARP: u32 = 0x0806;
const ETHERTYPE_IPV6: u32 = 0x86dd;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// Appends "A == k, else drop".
fn require(p: &mut Vec<Insn>, k: u32) {
    p.push(insn(JEQ, 1, 0, k));
    p.push(insn(RET, 0, 0, DROP));
}

/// Appends "A == k: pass".
fn pass_if(p: &mut Vec<Insn>, k: u32) {
    p.push(insn(JEQ, 0, 1, k));
    p.push(insn(RET, 0, 0, PASS));
}

/// Appends "the frame is at least `len` bytes, else drop": no load below
/// reads past the end (where classic BPF would end the program with 0,
/// which cls_bpf takes as "accept here" instead of the redirect).
fn require_len(p: &mut Vec<Insn>, len: u32) {
    p.push(insn(LD_LEN, 0, 0, 0));
    p.push(insn(JGE, 1, 0, len));
    p.push(insn(RET, 0, 0, DROP));
}

/// Appends "the 6 bytes at `at` are `mac`, else drop".
fn require_mac(p: &mut Vec<Insn>, at: u32, mac: [u8; 6]) {
    p.push(insn(LD_W, 0, 0, at));
    require(p, u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]));
    p.push(insn(LD_H, 0, 0, at + 4));
    require(p, u32::from(u16::from_be_bytes([mac[4], mac[5]])));
}

/// The anti-spoofing program: drop unless the source MAC is `mac` and the
/// frame is IPv4 from one of `v4`, ARP for IPv4 with sender `mac` and one
/// of `v4` (or 0.0.0.0, a probe), or IPv6 from one of `v6` (none: no
/// IPv6). Every jump is short and forward; the sections are reached with
/// `ja`, so the program stays valid whatever the number of addresses.
fn spoof_filter(mac: [u8; 6], v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Vec<Insn> {
    let mut head = Vec::new();
    head.push(insn(LD_W, 0, 0, VLAN_AVAIL));
    require(&mut head, 0);
    require_len(&mut head, ETH_HLEN);
    require_mac(&mut head, ETH_SRC, mac);
    head.push(insn(LD_H, 0, 0, ETH_TYPE));

    let mut ipv4 = Vec::new();
    require_len(&mut ipv4, ETH_HLEN + 20);
    ipv4.push(insn(LD_W, 0, 0, ETH_HLEN + 12));
    for a in v4 {
        pass_if(&mut ipv4, u32::from(*a));
    }
    ipv4.push(insn(RET, 0, 0, DROP));

    let mut arp = Vec::new();
    require_len(&mut arp, ETH_HLEN + 28);
    // Ethernet hardware (1), IPv4 protocol, 6-byte and 4-byte addresses:
    // the offsets below hold.
    arp.push(insn(LD_W, 0, 0, ETH_HLEN));
    require(&mut arp, 0x0001_0800);
    arp.push(insn(LD_H, 0, 0, ETH_HLEN + 4));
    require(&mut arp, 0x0604);
    require_mac(&mut arp, ETH_HLEN + 8, mac);
    arp.push(insn(LD_W, 0, 0, ETH_HLEN + 14));
    pass_if(&mut arp, 0);
    for a in v4 {
        pass_if(&mut arp, u32::from(*a));
    }
    arp.push(insn(RET, 0, 0, DROP));

    let mut ipv6 = Vec::new();
    require_len(&mut ipv6, ETH_HLEN + 40);
    for a in v6 {
        let o = a.octets();
        // Four words of the source address (offset 8 in the header); a
        // mismatch skips to the next address's block (9 instructions).
        for (i, word) in (0u8..).zip(o.chunks_exact(4)) {
            ipv6.push(insn(LD_W, 0, 0, ETH_HLEN + 8 + 4 * u32::from(i)));
            ipv6.push(insn(
                JEQ,
                0,
                7 - 2 * i,
                u32::from_be_bytes([word[0], word[1], word[2], word[3]]),
            ));
        }
        ipv6.push(insn(RET, 0, 0, PASS));
    }
    ipv6.push(insn(RET, 0, 0, DROP));

    // Dispatch by EtherType: `jeq type; ja section` pairs, then drop.
    let mut sections: Vec<(u32, Vec<Insn>)> = vec![(ETHERTYPE_IPV4, ipv4), (ETHERTYPE_ARP, arp)];
    if !v6.is_empty() {
        sections.push((ETHERTYPE_IPV6, ipv6));
    }
    let dispatch_len = 2 * sections.len() + 1;
    let mut program = head;
    let mut offset = 0usize;
    for (i, (ethertype, _)) in sections.iter().enumerate() {
        // From the instruction after this `ja` to the section's start.
        let after_ja = 2 * i + 2;
        let target = dispatch_len + offset;
        program.push(insn(JEQ, 0, 1, *ethertype));
        program.push(insn(
            JA,
            0,
            0,
            u32::try_from(target - after_ja).unwrap_or(u32::MAX),
        ));
        offset += sections[i].1.len();
    }
    program.push(insn(RET, 0, 0, DROP));
    for (_, section) in sections {
        program.extend(section);
    }
    program
}

/// The program as tc's `bytecode` argument: `N,code jt jf k,…`.
fn bytecode(program: &[Insn]) -> String {
    let mut s = program.len().to_string();
    for i in program {
        let _ = write!(s, ",{} {} {} {}", i.code, i.jt, i.jf, i.k);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic BPF interpreter for the instructions the program uses,
    /// with the kernel's rule that a load past the end returns 0.
    fn run(program: &[Insn], frame: &[u8], vlan: bool) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            let load = |at: u32, n: usize| -> Option<u32> {
                let at = usize::try_from(at).unwrap();
                frame
                    .get(at..at + n)
                    .map(|b| b.iter().fold(0u32, |v, x| (v << 8) | u32::from(*x)))
            };
            match i.code {
                LD_W if i.k == VLAN_AVAIL => a = u32::from(vlan),
                LD_W => match load(i.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_H => match load(i.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_LEN => a = u32::try_from(frame.len()).unwrap(),
                JEQ => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                JGE => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
                JA => pc += usize::try_from(i.k).unwrap(),
                RET => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    const MAC: [u8; 6] = [0xc2, 0xdf, 0x87, 0x94, 0xae, 0x38];
    const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    const IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 3);
    const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 200);

    fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(src);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn ipv4(src: Ipv4Addr) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0];
        h.extend(src.octets());
        h.extend([10, 250, 0, 2]);
        h.extend([0u8; 20]);
        h
    }

    fn arp(sha: [u8; 6], spa: Ipv4Addr) -> Vec<u8> {
        let mut h = vec![0, 1, 8, 0, 6, 4, 0, 1];
        h.extend(sha);
        h.extend(spa.octets());
        h.extend([0u8; 6]);
        h.extend([10, 213, 0, 1]);
        h
    }

    fn ipv6(src: Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, 58, 255];
        h.extend(src.octets());
        h.extend(Ipv6Addr::LOCALHOST.octets());
        h
    }

    #[test]
    fn only_the_assigned_mac_and_addresses_pass() {
        let p = spoof_filter(MAC, &[IP], &[]);
        let verdict = |f: &[u8]| run(&p, f, false);
        assert_eq!(verdict(&eth(MAC, 0x0800, &ipv4(IP))), PASS);
        assert_eq!(verdict(&eth(MAC, 0x0800, &ipv4(OTHER_IP))), DROP);
        assert_eq!(verdict(&eth(OTHER_MAC, 0x0800, &ipv4(IP))), DROP);
        assert_eq!(verdict(&eth(MAC, 0x0806, &arp(MAC, IP))), PASS);
        assert_eq!(
            verdict(&eth(MAC, 0x0806, &arp(MAC, Ipv4Addr::UNSPECIFIED))),
            PASS
        );
        assert_eq!(verdict(&eth(MAC, 0x0806, &arp(MAC, OTHER_IP))), DROP);
        assert_eq!(verdict(&eth(MAC, 0x0806, &arp(OTHER_MAC, IP))), DROP);
        // No IPv6 on the network: none from the guest, link-local included.
        assert_eq!(verdict(&eth(MAC, 0x86dd, &ipv6(link_local(MAC)))), DROP);
        // Other EtherTypes, tagged frames, truncated frames.
        assert_eq!(verdict(&eth(MAC, 0x88cc, &[0u8; 46])), DROP);
        assert_eq!(run(&p, &eth(MAC, 0x0800, &ipv4(IP)), true), DROP);
        assert_eq!(verdict(&eth(MAC, 0x0800, &[0x45, 0, 0])), DROP);
        assert_eq!(verdict(&eth(MAC, 0x0806, &[0, 1, 8, 0])), DROP);
        assert_eq!(verdict(&[0u8; 10]), DROP);
        let mut bad_arp = arp(MAC, IP);
        bad_arp[4] = 8;
        assert_eq!(verdict(&eth(MAC, 0x0806, &bad_arp)), DROP);
    }

    #[test]
    fn ipv6_sources_are_checked_when_the_network_has_ipv6() {
        let global: Ipv6Addr = "fd00:213::3".parse().unwrap();
        let v4: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let v6 = [global, link_local(MAC), Ipv6Addr::UNSPECIFIED];
        let p = spoof_filter(MAC, &v4, &v6);
        for ok in v6 {
            assert_eq!(run(&p, &eth(MAC, 0x86dd, &ipv6(ok)), false), PASS, "{ok}");
        }
        for bad in [
            "fd00:213::4".parse().unwrap(),
            link_local(OTHER_MAC),
            "fe80::1".parse().unwrap(),
        ] {
            assert_eq!(run(&p, &eth(MAC, 0x86dd, &ipv6(bad)), false), DROP, "{bad}");
        }
        assert_eq!(
            run(
                &p,
                &eth(MAC, 0x0800, &ipv4(Ipv4Addr::new(10, 0, 0, 40))),
                false
            ),
            PASS
        );
        assert_eq!(run(&p, &eth(MAC, 0x86dd, &[0x60; 30]), false), DROP);
    }

    #[test]
    fn link_local_is_eui64_and_bytecode_is_tcs_format() {
        assert_eq!(
            link_local(MAC),
            "fe80::c0df:87ff:fe94:ae38".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(parse_mac("c2:df:87:94:ae:38"), Some(MAC));
        assert_eq!(parse_mac("c2:df:87:94:ae"), None);
        assert_eq!(parse_mac("c2:df:87:94:ae:38:00"), None);
        assert_eq!(parse_mac("c2:df:87:94:ae:3"), None);
        let p = [insn(LD_H, 0, 0, 12), insn(RET, 0, 0, DROP)];
        assert_eq!(bytecode(&p), "2,40 0 0 12,6 0 0 2");
    }

    #[test]
    fn host_table_is_per_bridge_and_names_are_checked() {
        let fw = HostFirewall::for_bridge("capsid0").unwrap();
        assert_eq!(fw.table(), "capsid-capsid0");
        let rules = fw.ruleset();
        assert!(
            rules.starts_with("table inet capsid-capsid0 {\n"),
            "{rules}"
        );
        assert!(
            rules.contains("iifname \"capsid0\" ct state established,related accept\n"),
            "{rules}"
        );
        assert!(
            rules.contains("iifname \"capsid0\" counter drop"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "type nat hook postrouting priority srcnat; policy accept;\n\
                 \t\tiifname \"capsid0\" oifname \"capsid0\" ct status dnat counter masquerade"
            ),
            "{rules}"
        );
        assert!(HostFirewall::for_bridge("br\"0").is_err());
        assert!(HostFirewall::for_bridge("").is_err());
        assert!(HostFirewall::for_bridge("br-0.x").is_ok());
    }
}
