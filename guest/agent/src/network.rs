//! The pod network in the guest (docs/networking.md): the host mirrors the pod's `eth0` to the
//! VM's virtio-net device and sends its configuration once ([`configure`]); the agent gives the
//! device the pod interface's name, MTU, addresses, routes and permanent neighbours, over
//! rtnetlink, in the guest's root network namespace, which the pod's containers share.

use std::net::IpAddr;

use switchyard_rtnl::{LinkChange, Route, Rtnl};
use yard_agent_protocol as proto;

use crate::error::{Error, Result};

fn invalid(what: String) -> Error {
    Error::InvalidArgument(format!("NetworkConfig: {what}"))
}

fn netlink(what: &str) -> impl FnOnce(switchyard_rtnl::RtnlError) -> Error + '_ {
    move |e| Error::Internal(format!("{what}: {}", crate::error::chain(&e)))
}

/// `IP/PREFIX`, the prefix in range for the family.
fn parse_cidr(field: &str, s: &str) -> Result<(IpAddr, u8)> {
    let bad = || invalid(format!("{field}: {s:?} is not IP/PREFIX"));
    let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((ip, prefix))
}

fn parse_ip(field: &str, s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| invalid(format!("{field}: {s:?} is not an IP address")))
}

fn parse_mac(field: &str, m: &[u8]) -> Result<[u8; 6]> {
    m.try_into()
        .map_err(|_| invalid(format!("{field}: {} bytes, not a 6-byte MAC", m.len())))
}

/// Checks the whole request before anything changes: counts, names, addresses.
fn check(c: &proto::NetworkConfig) -> Result<()> {
    let bound = |what: &str, n: usize, max: usize| {
        if n > max {
            Err(invalid(format!("{n} {what} (at most {max})")))
        } else {
            Ok(())
        }
    };
    bound("interfaces", c.interfaces.len(), proto::MAX_NET_INTERFACES)?;
    bound("routes", c.routes.len(), proto::MAX_NET_ROUTES)?;
    bound("neighbours", c.neighbours.len(), proto::MAX_NET_NEIGHBOURS)?;
    for (i, itf) in c.interfaces.iter().enumerate() {
        if itf.name.is_empty() || itf.name.len() > 15 || itf.name.contains(['/', '\0', ' ']) {
            return Err(invalid(format!(
                "interfaces[{i}].name: {:?} is not an interface name",
                itf.name
            )));
        }
        parse_mac(&format!("interfaces[{i}].mac"), &itf.mac)?;
        bound("addresses", itf.addresses.len(), proto::MAX_NET_ADDRESSES)?;
        for (j, a) in itf.addresses.iter().enumerate() {
            parse_cidr(&format!("interfaces[{i}].addresses[{j}]"), a)?;
        }
    }
    let known = |field: String, device: &str| {
        if c.interfaces.iter().any(|i| i.name == device) {
            Ok(())
        } else {
            Err(invalid(format!("{field}: no interface {device:?}")))
        }
    };
    for (i, r) in c.routes.iter().enumerate() {
        if !r.destination.is_empty() {
            parse_cidr(&format!("routes[{i}].destination"), &r.destination)?;
        }
        parse_ip(&format!("routes[{i}].gateway"), &r.gateway)?;
        parse_ip(&format!("routes[{i}].source"), &r.source)?;
        known(format!("routes[{i}].device"), &r.device)?;
    }
    for (i, n) in c.neighbours.iter().enumerate() {
        parse_ip(&format!("neighbours[{i}].ip"), &n.ip)?
            .ok_or_else(|| invalid(format!("neighbours[{i}].ip: empty")))?;
        parse_mac(&format!("neighbours[{i}].mac"), &n.mac)?;
        known(format!("neighbours[{i}].device"), &n.device)?;
    }
    if c.hostname.len() > 64 {
        return Err(invalid(format!(
            "hostname: {} bytes (at most 64)",
            c.hostname.len()
        )));
    }
    Ok(())
}

/// Sets `lo` up in the calling thread's network namespace (`ip link set lo up`).
pub fn loopback_up() -> std::io::Result<()> {
    Rtnl::open()
        .and_then(|mut r| r.set_up_by_name("lo"))
        .map_err(|e| std::io::Error::other(crate::error::chain(&e)))
}

/// Applies `c` in the calling thread's network namespace. Blocking.
pub fn configure(c: &proto::NetworkConfig) -> Result<()> {
    check(c)?;
    let mut rtnl = Rtnl::open().map_err(netlink("rtnetlink"))?;
    rtnl.set_up_by_name("lo").map_err(netlink("bring lo up"))?;
    let links = rtnl.links().map_err(netlink("list links"))?;
    let mut index_of = std::collections::HashMap::new();
    for itf in &c.interfaces {
        let mac = parse_mac("mac", &itf.mac)?;
        let Some(link) = links.iter().find(|l| l.mac == Some(mac) && !l.loopback) else {
            return Err(Error::FailedPrecondition(format!(
                "NetworkConfig: no network device with MAC {} in the guest (is the VM's \
                 virtio-net device there?)",
                mac.map(|b| format!("{b:02x}")).join(":")
            )));
        };
        if link.name != itf.name {
            rtnl.set_link(
                link.index,
                &LinkChange {
                    up: Some(false),
                    ..Default::default()
                },
            )
            .map_err(netlink("set the interface down"))?;
            rtnl.set_link(
                link.index,
                &LinkChange {
                    name: Some(itf.name.clone()),
                    ..Default::default()
                },
            )
            .map_err(netlink("rename the interface"))?;
        }
        rtnl.set_link(
            link.index,
            &LinkChange {
                mtu: (itf.mtu > 0).then_some(itf.mtu),
                up: Some(true),
                ..Default::default()
            },
        )
        .map_err(netlink("set the interface up"))?;
        for a in &itf.addresses {
            let (ip, prefix) = parse_cidr("address", a)?;
            rtnl.add_address(link.index, ip, prefix)
                .map_err(netlink(&format!("add {a} to {}", itf.name)))?;
        }
        index_of.insert(itf.name.clone(), link.index);
    }
    for n in &c.neighbours {
        let ip = parse_ip("ip", &n.ip)?.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        rtnl.add_neighbour(index_of[&n.device], ip, parse_mac("mac", &n.mac)?)
            .map_err(netlink(&format!("add neighbour {}", n.ip)))?;
    }
    for r in &c.routes {
        let route = Route {
            destination: if r.destination.is_empty() {
                None
            } else {
                Some(parse_cidr("destination", &r.destination)?)
            },
            gateway: parse_ip("gateway", &r.gateway)?,
            oif: None,
            source: parse_ip("source", &r.source)?,
            metric: (r.metric > 0).then_some(r.metric),
            ipv6: r.ipv6,
            kernel: false,
            link_scope: r.gateway.is_empty(),
        };
        match rtnl.add_route(index_of[&r.device], &route) {
            Ok(()) => {}
            // The kernel made the same route for an address already.
            Err(switchyard_rtnl::RtnlError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(netlink(&format!("add route {r:?}"))(e));
            }
        }
    }
    if !c.hostname.is_empty() {
        nix::unistd::sethostname(&c.hostname).map_err(|e| Error::Io {
            what: format!("set the hostname {:?}", c.hostname),
            source: e.into(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> proto::NetworkConfig {
        proto::NetworkConfig {
            interfaces: vec![proto::Interface {
                name: "eth0".into(),
                mac: vec![0x0a, 0x58, 0, 0, 0, 1],
                mtu: 1500,
                addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()],
                ..Default::default()
            }],
            routes: vec![proto::Route {
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    type Change = Box<dyn Fn(&mut proto::NetworkConfig)>;

    #[test]
    fn a_config_is_checked_whole_and_errors_name_the_field() {
        check(&config()).unwrap();
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c| c.interfaces[0].addresses[0] = "10.88.0.5/33".into()),
                "interfaces[0].addresses[0]",
            ),
            (
                Box::new(|c| c.interfaces[0].mac = vec![1, 2, 3]),
                "interfaces[0].mac: 3 bytes",
            ),
            (
                Box::new(|c| c.interfaces[0].name = "../x".into()),
                "interfaces[0].name",
            ),
            (
                Box::new(|c| c.routes[0].device = "eth1".into()),
                "routes[0].device: no interface \"eth1\"",
            ),
            (
                Box::new(|c| c.routes[0].gateway = "gw".into()),
                "routes[0].gateway",
            ),
            (
                Box::new(|c| c.routes = vec![c.routes[0].clone(); proto::MAX_NET_ROUTES + 1]),
                "257 routes (at most 256)",
            ),
            (
                Box::new(|c| c.hostname = "h".repeat(65)),
                "hostname: 65 bytes",
            ),
        ];
        for (change, want) in cases {
            let mut c = config();
            change(&mut c);
            let e = check(&c).unwrap_err().to_string();
            assert!(
                e.starts_with("NetworkConfig: ") && e.contains(want),
                "{e} / {want}"
            );
        }
    }
}
