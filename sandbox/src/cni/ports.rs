//! Published ports: `HOST:CONTAINER[/tcp|udp]`, checked free on the host
//! before anything is set up, and handed to the `portmap` plugin as the
//! `portMappings` capability (CNI conventions, "Port mappings").

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::str::FromStr;

use serde_json::{json, Value};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The name portmap expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the container.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.container_port,
            self.protocol.as_str()
        )
    }
}

fn parse_port(text: &str, which: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(u16::try_from(p).unwrap_or(u16::MAX)),
        Ok(p) => Err(format!("{which} port {p} is not between 1 and 65535")),
        Err(_) if text.is_empty() => Err(format!("the {which} port is missing")),
        Err(_) => Err(format!("{which} port {text:?} is not a number")),
    }
}

impl FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ports, protocol) = match s.split_once('/') {
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => {
                return Err(format!("protocol {other:?} is not tcp or udp"));
            }
            None => (s, Protocol::Tcp),
        };
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| "expected HOST:CONTAINER[/tcp|udp]".to_string())?;
        Ok(Self {
            host_port: parse_port(host, "host")?,
            container_port: parse_port(container, "container")?,
            protocol,
        })
    }
}

impl PortMapping {
    /// The `portMappings` entry.
    pub fn to_cni(&self) -> Value {
        json!({
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.as_str(),
        })
    }

    /// Binds the host port (all addresses) and lets it go: fails when a
    /// process already listens on it, which the DNAT rules would otherwise
    /// silently shadow.
    pub fn check_free(&self) -> Result<(), String> {
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.host_port);
        let bound = match self.protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        };
        bound.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "host port {}/{} is already in use",
                    self.host_port,
                    self.protocol.as_str()
                )
            } else {
                format!(
                    "cannot bind host port {}/{}: {e}",
                    self.host_port,
                    self.protocol.as_str()
                )
            }
        })
    }
}

/// Refuses the same host port and protocol published twice.
pub fn check_distinct(ports: &[PortMapping]) -> Result<(), String> {
    for (i, p) in ports.iter().enumerate() {
        if ports[..i]
            .iter()
            .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
        {
            return Err(format!(
                "host port {}/{} is published twice",
                p.host_port,
                p.protocol.as_str()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_syntax() {
        let p: PortMapping = "18080:80".parse().unwrap();
        assert_eq!(
            p,
            PortMapping {
                host_port: 18080,
                container_port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            "53:5353/udp".parse::<PortMapping>().unwrap().protocol,
            Protocol::Udp
        );
        assert_eq!(
            "1:2/tcp".parse::<PortMapping>().unwrap().to_string(),
            "1:2/tcp"
        );
        for (bad, why) in [
            ("99999:80", "host port 99999 is not between 1 and 65535"),
            ("0:80", "host port 0 is not between 1 and 65535"),
            ("80:70000", "container port 70000"),
            ("abc", "expected HOST:CONTAINER"),
            ("abc:80", "host port \"abc\" is not a number"),
            (":80", "the host port is missing"),
            ("80:", "the container port is missing"),
            ("80:80/sctp", "protocol \"sctp\" is not tcp or udp"),
            ("80:80/", "protocol \"\""),
            ("-1:80", "is not a number"),
            ("1.2.3.4:80:80", "is not a number"),
        ] {
            let e = bad.parse::<PortMapping>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn cni_form() {
        let p: PortMapping = "8080:80/udp".parse().unwrap();
        assert_eq!(
            p.to_cni(),
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "udp"})
        );
    }

    #[test]
    fn busy_ports_are_named() {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p: PortMapping = format!("{port}:80").parse().unwrap();
        assert_eq!(
            p.check_free().unwrap_err(),
            format!("host port {port}/tcp is already in use")
        );
        drop(l);
        assert!(p.check_free().is_ok());
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = u.local_addr().unwrap().port();
        let p: PortMapping = format!("{port}:80/udp").parse().unwrap();
        assert!(p
            .check_free()
            .unwrap_err()
            .contains("/udp is already in use"));
    }

    #[test]
    fn duplicates_are_refused() {
        let a: PortMapping = "80:80".parse().unwrap();
        let b: PortMapping = "80:81".parse().unwrap();
        let c: PortMapping = "80:80/udp".parse().unwrap();
        assert!(check_distinct(&[a, c]).is_ok());
        assert_eq!(
            check_distinct(&[a, c, b]).unwrap_err(),
            "host port 80/tcp is published twice"
        );
    }
}
