//! Configuring the guest's network interfaces from the host's
//! ConfigureNetwork request: each NIC, found by MAC address, gets its MTU and
//! addresses and is brought up; then the routes are added. Everything is
//! checked before anything is changed, and applied over rtnetlink.

use std::collections::HashMap;
use std::net::IpAddr;

use capsid_protocol::agent::ConfigureNetworkRequest;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// At most this many interfaces, addresses per interface and routes.
const MAX_INTERFACES: usize = 8;
const MAX_ADDRESSES: usize = 32;
const MAX_ROUTES: usize = 256;

/// Errors of network configuration.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    /// The request is malformed.
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    /// No NIC has the MAC address asked for.
    #[error("no network interface with MAC address {mac} (present: {present})")]
    NoSuchInterface {
        /// The MAC asked for.
        mac: String,
        /// What the guest has.
        present: String,
    },
    /// The kernel refused a change.
    #[error("{what}")]
    Netlink {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The task applying the configuration ended without a result (it
    /// panicked); reported as an invalid request, as it always was.
    #[error("invalid network configuration: network task")]
    Task(#[source] tokio::task::JoinError),
}

/// A netlink reply that does not decode (carried inside the io::Error of
/// the request, whose sources [`crate::describe`] reaches).
#[derive(Debug, thiserror::Error)]
#[error("bad netlink reply")]
struct BadReply(#[source] netlink_packet_core::DecodeError);

type Result<T> = std::result::Result<T, NetconfError>;

/// A validated interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    mac: [u8; 6],
    /// The MAC to find the NIC by, when it is to change to `mac`.
    boot_mac: Option<[u8; 6]>,
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    mac: [u8; 6],
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    interfaces: Vec<Interface>,
    routes: Vec<Route>,
}

/// Checks the request, then applies it on a blocking thread.
pub async fn configure(req: &ConfigureNetworkRequest) -> Result<()> {
    let plan = plan(req)?;
    tokio::task::spawn_blocking(move || apply(&plan))
        .await
        .map_err(NetconfError::Task)?
}

/// Checks every field of the request.
pub fn plan(req: &ConfigureNetworkRequest) -> Result<Plan> {
    let invalid = |m: String| NetconfError::Invalid(m);
    if req.interfaces.len() > MAX_INTERFACES {
        return Err(invalid(format!("more than {MAX_INTERFACES} interfaces")));
    }
    if req.routes.len() > MAX_ROUTES {
        return Err(invalid(format!("more than {MAX_ROUTES} routes")));
    }
    let mut interfaces: Vec<Interface> = Vec::new();
    for i in &req.interfaces {
        let mac = parse_mac(&i.mac).map_err(invalid)?;
        let boot_mac = match i.boot_mac.as_str() {
            "" => None,
            m => Some(parse_mac(m).map_err(invalid)?).filter(|b| *b != mac),
        };
        if interfaces.iter().any(|o| o.mac == mac) {
            return Err(invalid(format!("interface {} given twice", i.mac)));
        }
        if i.mtu != 0 && !(68..=65535).contains(&i.mtu) {
            return Err(invalid(format!(
                "MTU {} of {} is out of range (68-65535)",
                i.mtu, i.mac
            )));
        }
        if i.addresses.len() > MAX_ADDRESSES {
            return Err(invalid(format!(
                "more than {MAX_ADDRESSES} addresses on {}",
                i.mac
            )));
        }
        let mut addresses = Vec::new();
        for a in &i.addresses {
            let (addr, len) = parse_prefix(a).map_err(invalid)?;
            if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
                return Err(invalid(format!("{a} cannot be an interface address")));
            }
            addresses.push((addr, len));
        }
        interfaces.push(Interface {
            mac,
            boot_mac,
            mtu: i.mtu,
            addresses,
        });
    }
    let mut routes = Vec::new();
    for r in &req.routes {
        let mac = parse_mac(&r.interface_mac).map_err(invalid)?;
        if !interfaces.iter().any(|i| i.mac == mac) {
            return Err(invalid(format!(
                "route to {:?} leaves by {}, which is not among the interfaces",
                r.destination, r.interface_mac
            )));
        }
        let destination = match r.destination.as_str() {
            "" => None,
            d => Some(parse_prefix(d).map_err(invalid)?),
        };
        let gateway = match r.gateway.as_str() {
            "" => None,
            g => Some(
                g.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("gateway {g:?} is not an IP address")))?,
            ),
        };
        match (destination, gateway) {
            (None, None) => {
                return Err(invalid("a default route needs a gateway".into()));
            }
            (Some((d, _)), Some(g)) if d.is_ipv4() != g.is_ipv4() => {
                return Err(invalid(format!(
                    "route to {} via {g} mixes address families",
                    r.destination
                )));
            }
            _ => {}
        }
        if gateway.is_some_and(|g| g.is_unspecified() || g.is_multicast()) {
            return Err(invalid(format!(
                "gateway {} is not a unicast address",
                r.gateway
            )));
        }
        routes.push(Route {
            destination,
            gateway,
            mac,
        });
    }
    Ok(Plan { interfaces, routes })
}

/// Applies a checked plan (blocking: a handful of netlink round trips).
pub fn apply(plan: &Plan) -> Result<()> {
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    let mut index_of = HashMap::new();
    for iface in &plan.interfaces {
        let find_by = iface.boot_mac.unwrap_or(iface.mac);
        let index = links
            .iter()
            .find(|(_, mac, _)| *mac == Some(find_by))
            .map(|(index, _, _)| *index)
            .ok_or_else(|| NetconfError::NoSuchInterface {
                mac: format_mac(&find_by),
                present: links
                    .iter()
                    .map(|(_, mac, name)| {
                        format!("{name} {}", mac.map_or("-".into(), |m| format_mac(&m)))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        index_of.insert(iface.mac, index);
        let name = format_mac(&iface.mac);
        if iface.boot_mac.is_some() {
            nl.set_mac(index, iface.mac)
                .map_err(|source| NetconfError::Netlink {
                    what: format!("giving {} the MAC {name}", format_mac(&find_by)),
                    source,
                })?;
        }
        nl.set_link(index, iface.mtu)
            .map_err(|source| NetconfError::Netlink {
                what: format!("setting MTU {} and up on {name}", iface.mtu),
                source,
            })?;
        for &(addr, len) in &iface.addresses {
            nl.add_address(index, addr, len)
                .map_err(|source| NetconfError::Netlink {
                    what: format!("adding {addr}/{len} to {name}"),
                    source,
                })?;
        }
    }
    // Routes on the link first: a gateway must be reachable when its route
    // is added.
    let (direct, via): (Vec<&Route>, Vec<&Route>) =
        plan.routes.iter().partition(|r| r.gateway.is_none());
    for route in direct.into_iter().chain(via) {
        let index = index_of.get(&route.mac).copied().unwrap_or(0);
        nl.add_route(index, route)
            .map_err(|source| NetconfError::Netlink {
                what: format!(
                    "adding the route to {} via {}",
                    route
                        .destination
                        .map_or("default".into(), |(a, l)| format!("{a}/{l}")),
                    route.gateway.map_or("the link".into(), |g| g.to_string())
                ),
                source,
            })?;
    }
    tracing::info!(
        interfaces = plan.interfaces.len(),
        routes = plan.routes.len(),
        "network configured"
    );
    Ok(())
}

fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("{s} is not a unicast MAC address"));
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_prefix(s: &str) -> std::result::Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{len:?} in {s:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("prefix length {len} in {s:?} is longer than {max}"));
    }
    Ok((addr, len))
}

fn family(addr: &IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A guest link: index, MAC address (if Ethernet-like), name.
type Link = (u32, Option<[u8; 6]>, String);

/// A blocking rtnetlink socket.
struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Self> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| NetconfError::Netlink { what, source }
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io("opening a netlink socket"))?;
        socket
            .bind_auto()
            .map_err(io("binding the netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("connecting the netlink socket"))?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects the answers until the ack (or the
    /// end of a dump).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                        .map_err(|e| std::io::Error::other(BadReply(e)))?;
                let len = usize::try_from(reply.header.length).unwrap_or(0);
                if len == 0 {
                    return Err(std::io::Error::other("netlink reply of length 0"));
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }

    /// (index, MAC, name) of every link.
    fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .map_err(|source| NetconfError::Netlink {
                what: "listing network interfaces".into(),
                source,
            })?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|link| {
                let mut mac = None;
                let mut name = String::new();
                for attr in &link.attributes {
                    match attr {
                        LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                        LinkAttribute::IfName(n) => name.clone_from(n),
                        _ => {}
                    }
                }
                (link.header.index, mac, name)
            })
            .collect())
    }

    fn set_link(&mut self, index: u32, mtu: u32) -> std::io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        if mtu != 0 {
            link.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
            .map(drop)
    }

    /// Gives the (down) link another MAC: the frames it sends then carry the
    /// address its peers know it by.
    fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> std::io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.request(RouteNetlinkMessage::SetLink(link), NLM_F_ACK)
            .map(drop)
    }

    fn add_address(&mut self, index: u32, addr: IpAddr, len: u8) -> std::io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family(&addr);
        msg.header.prefix_len = len;
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        // The address was assigned by the host's IPAM: no duplicate
        // detection delay before the guest can use it.
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Address(addr));
        if addr.is_ipv4() {
            msg.attributes.push(AddressAttribute::Local(addr));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    fn add_route(&mut self, index: u32, route: &Route) -> std::io::Result<()> {
        let fam = match (route.destination, route.gateway) {
            (Some((d, _)), _) => family(&d),
            (None, Some(g)) => family(&g),
            (None, None) => AddressFamily::Inet,
        };
        let mut msg = RouteMessage::default();
        msg.header.address_family = fam;
        msg.header.destination_prefix_length = route.destination.map_or(0, |(_, l)| l);
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        msg.header.kind = RouteType::Unicast;
        if let Some((d, _)) = route.destination {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(d)));
        }
        if let Some(g) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsid_protocol::agent::{NetworkInterface, NetworkRoute};

    fn iface(mac: &str, mtu: u32, addrs: &[&str]) -> NetworkInterface {
        let mut i = NetworkInterface::new();
        i.mac = mac.into();
        i.mtu = mtu;
        i.addresses = addrs.iter().map(|a| a.to_string()).collect();
        i
    }

    fn route(dst: &str, gw: &str, mac: &str) -> NetworkRoute {
        let mut r = NetworkRoute::new();
        r.destination = dst.into();
        r.gateway = gw.into();
        r.interface_mac = mac.into();
        r
    }

    fn req(i: Vec<NetworkInterface>, r: Vec<NetworkRoute>) -> ConfigureNetworkRequest {
        let mut q = ConfigureNetworkRequest::new();
        q.interfaces = i;
        q.routes = r;
        q
    }

    const MAC: &str = "02:42:0a:58:00:05";

    #[test]
    fn a_good_request_is_planned() {
        let p = plan(&req(
            vec![iface(MAC, 1500, &["10.88.0.5/16", "fd00::5/64"])],
            vec![
                route("", "10.88.0.1", MAC),
                route("10.99.0.0/16", "", MAC),
                route("", "fd00::1", MAC),
            ],
        ))
        .unwrap();
        assert_eq!(p.interfaces[0].mac, [2, 0x42, 0x0a, 0x58, 0, 5]);
        assert_eq!(p.interfaces[0].addresses.len(), 2);
        assert_eq!(p.routes.len(), 3);
        assert_eq!(p.routes[0].destination, None);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let cases = [
            req(vec![iface("02:42:0a:58:00", 1500, &[])], vec![]),
            req(vec![iface("01:00:5e:00:00:01", 1500, &[])], vec![]),
            req(vec![iface("00:00:00:00:00:00", 1500, &[])], vec![]),
            req(vec![iface(MAC, 1500, &[]), iface(MAC, 1500, &[])], vec![]),
            req(vec![iface(MAC, 67, &[])], vec![]),
            req(vec![iface(MAC, 70000, &[])], vec![]),
            req(vec![iface(MAC, 1500, &["10.0.0.1"])], vec![]),
            req(vec![iface(MAC, 1500, &["10.0.0.1/33"])], vec![]),
            req(vec![iface(MAC, 1500, &["fd00::1/129"])], vec![]),
            req(vec![iface(MAC, 1500, &["224.0.0.1/4"])], vec![]),
            req(vec![iface(MAC, 1500, &["0.0.0.0/0"])], vec![]),
            req(vec![iface(MAC, 1500, &["x/8"])], vec![]),
            req(vec![iface(MAC, 1500, &[])], vec![route("", "", MAC)]),
            req(
                vec![iface(MAC, 1500, &[])],
                vec![route("", "10.0.0.1", "02:00:00:00:00:09")],
            ),
            req(
                vec![iface(MAC, 1500, &[])],
                vec![route("10.0.0.0/8", "fd00::1", MAC)],
            ),
            req(
                vec![iface(MAC, 1500, &[])],
                vec![route("", "nonsense", MAC)],
            ),
            req(vec![iface(MAC, 1500, &[])], vec![route("", "0.0.0.0", MAC)]),
            req(
                vec![iface(MAC, 1500, &[])],
                vec![route("10.0.0.0/99", "", MAC)],
            ),
            req(vec![iface(MAC, 1500, &["10.0.0.1/8"; 33])], vec![]),
        ];
        for (n, case) in cases.iter().enumerate() {
            let err = plan(case).expect_err(&format!("case {n} accepted"));
            assert!(
                err.to_string()
                    .starts_with("invalid network configuration: "),
                "{err}"
            );
        }
        let many = req(vec![iface(MAC, 0, &[]); 9], vec![]);
        assert!(plan(&many).is_err());
    }

    #[test]
    fn macs_round_trip() {
        assert_eq!(format_mac(&parse_mac(MAC).unwrap()), MAC);
        assert!(parse_mac("02:42:0a:58:00:05:06").is_err());
        assert!(parse_mac("2:42:0a:58:00:05").is_err());
    }

    /// The host gets `describe(error)`: the kernel's reason follows what
    /// was being done, once.
    #[test]
    fn netlink_errors_name_their_reason_once() {
        let e = NetconfError::Netlink {
            what: "adding 10.0.0.2/24 to 02:42:0a:58:00:05".into(),
            source: std::io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(
            crate::describe(&e),
            format!(
                "adding 10.0.0.2/24 to 02:42:0a:58:00:05: {}",
                std::io::Error::from_raw_os_error(libc::EEXIST)
            )
        );
        let e = NetconfError::Netlink {
            what: "listing network interfaces".into(),
            source: std::io::Error::other(BadReply("short buffer".into())),
        };
        assert_eq!(
            crate::describe(&e),
            "listing network interfaces: bad netlink reply: short buffer"
        );
    }
}
