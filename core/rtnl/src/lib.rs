//! A small synchronous rtnetlink client for one network namespace: the calling thread's, when
//! [`Rtnl::open`] ran.
//!
//! What the pod network of a VM needs (docs/networking.md), on both sides of the VM:
//! - the vm shim reads the pod's `eth0` ([`Rtnl::links`], [`Rtnl::addresses`],
//!   [`Rtnl::routes`], [`Rtnl::neighbours`]) and mirrors it to a tap with tc
//!   ([`Rtnl::add_ingress_qdisc`], [`Rtnl::redirect_ingress`]);
//! - the guest agent gives its virtio-net interface the same configuration
//!   ([`Rtnl::set_link`], [`Rtnl::add_address`], [`Rtnl::add_route`], [`Rtnl::add_neighbour`]);
//! - switchyard-cni brings a new pod namespace's loopback up.
//!
//! Messages are built and parsed by `netlink-packet-route`; this crate only sends one request
//! at a time and reads its answer (an ACK, an error, or a bounded dump). Blocking: an async
//! caller runs it on a blocking thread.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// At most this many entries in one dump: a namespace a CNI plugin (semi-trusted) filled with
/// more is refused rather than read without end.
pub const MAX_DUMP_ENTRIES: usize = 4096;

/// The ethertype `ETH_P_ALL` in network order, as tc's `protocol all` sends it.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("rtnetlink socket")]
    Socket(#[source] io::Error),
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: undecodable answer: {detail}")]
    Decode { what: String, detail: String },
    #[error("{what}: more than {MAX_DUMP_ENTRIES} entries")]
    TooMany { what: String },
}

pub type Result<T> = std::result::Result<T, RtnlError>;

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address of an Ethernet-like interface.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
}

/// An address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
    /// Link-local and host-scoped addresses are the interface's own, not the network's.
    pub global: bool,
}

/// A route of the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route of its family.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub metric: Option<u32>,
    pub ipv6: bool,
    /// The kernel made it for an address (`proto kernel`); adding the address makes it again.
    pub kernel: bool,
    /// `scope link`: the destination is on the link, no gateway.
    pub link_scope: bool,
}

/// A neighbour (ARP or NDP) entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: [u8; 6],
    /// Set by hand (`nud permanent`), as some CNI plugins do for a gateway; learnt entries are
    /// the kernel's.
    pub permanent: bool,
}

/// What [`Rtnl::set_link`] changes; `None` leaves a field.
#[derive(Clone, Debug, Default)]
pub struct LinkChange {
    pub name: Option<String>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
}

/// An rtnetlink socket in the namespace of the thread that opened it.
pub struct Rtnl {
    sock: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Rtnl> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(RtnlError::Socket)?;
        sock.bind_auto().map_err(RtnlError::Socket)?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.sock
            .send(&out, 0)
            .map_err(|source| RtnlError::Kernel {
                what: what.to_owned(),
                source,
            })?;
        Ok(self.seq)
    }

    /// Reads the answers to request `seq` until `done` says so; messages of other sequence
    /// numbers (none are expected on this socket) are skipped.
    fn answers(
        &mut self,
        seq: u32,
        what: &str,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Result<bool>,
    ) -> Result<()> {
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|source| RtnlError::Kernel {
                    what: what.to_owned(),
                    source,
                })?;
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map(|b| b.length() as usize)
                    .map_err(|e| RtnlError::Decode {
                        what: what.to_owned(),
                        detail: e.to_string(),
                    })?;
                if len == 0 || len > bytes.len() {
                    return Err(RtnlError::Decode {
                        what: what.to_owned(),
                        detail: format!("message length {len} in {} bytes", bytes.len()),
                    });
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                    .map_err(|e| RtnlError::Decode {
                        what: what.to_owned(),
                        detail: e.to_string(),
                    })?;
                // Messages are 4-byte aligned in a datagram.
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                if !each(msg.payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// One request that changes something, and its ACK.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<()> {
        let seq = self.send(msg, NLM_F_ACK | flags, what)?;
        self.answers(seq, what, |payload| match payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(false),
                Some(_) => Err(RtnlError::Kernel {
                    what: what.to_owned(),
                    source: e.to_io(),
                }),
            },
            _ => Ok(true),
        })
    }

    /// A dump: every answer until `NLMSG_DONE`, at most [`MAX_DUMP_ENTRIES`].
    fn dump(&mut self, msg: RouteNetlinkMessage, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_DUMP, what)?;
        let mut out = Vec::new();
        let mut too_many = false;
        self.answers(seq, what, |payload| match payload {
            NetlinkPayload::Done(_) => Ok(false),
            NetlinkPayload::Error(e) if e.code.is_some() => Err(RtnlError::Kernel {
                what: what.to_owned(),
                source: e.to_io(),
            }),
            NetlinkPayload::InnerMessage(m) => {
                if out.len() < MAX_DUMP_ENTRIES {
                    out.push(m);
                } else {
                    // Read on to DONE, so the socket stays usable, but refuse the dump.
                    too_many = true;
                }
                Ok(true)
            }
            _ => Ok(true),
        })?;
        if too_many {
            return Err(RtnlError::TooMany {
                what: what.to_owned(),
            });
        }
        Ok(out)
    }

    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "list links",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| {
                let mut link = Link {
                    index: l.header.index,
                    name: String::new(),
                    mac: None,
                    mtu: 0,
                    up: l.header.flags.contains(LinkFlags::Up),
                    loopback: l.header.flags.contains(LinkFlags::Loopback),
                };
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Address(m) => link.mac = mac_of(&m),
                        LinkAttribute::Mtu(m) => link.mtu = m,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    /// The interface named `name`.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every address of the namespace, IPv4 and IPv6.
    pub fn addresses(&mut self) -> Result<Vec<Address>> {
        let answers = self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "list addresses",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .filter_map(|a| {
                // IFA_ADDRESS is the peer on a point-to-point link; IFA_LOCAL the own address.
                let mut ip = None;
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Local(l) => ip = Some(*l),
                        AddressAttribute::Address(l) if ip.is_none() => ip = Some(*l),
                        _ => {}
                    }
                }
                Some(Address {
                    index: a.header.index,
                    ip: ip?,
                    prefix: a.header.prefix_len,
                    global: a.header.scope == AddressScope::Universe,
                })
            })
            .collect())
    }

    /// The routes of the main table, IPv4 and IPv6.
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = family;
            let answers = self.dump(RouteNetlinkMessage::GetRoute(m), "list routes")?;
            for m in answers {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                let mut table = u32::from(r.header.table);
                let mut route = Route {
                    destination: None,
                    gateway: None,
                    oif: None,
                    source: None,
                    metric: None,
                    ipv6: family == AddressFamily::Inet6,
                    kernel: r.header.protocol == RouteProtocol::Kernel,
                    link_scope: r.header.scope == RouteScope::Link,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(d) => {
                            route.destination =
                                route_ip(d).map(|ip| (ip, r.header.destination_prefix_length));
                        }
                        RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
                        RouteAttribute::PrefSource(s) => route.source = route_ip(s),
                        RouteAttribute::Oif(i) => route.oif = Some(*i),
                        RouteAttribute::Priority(p) => route.metric = Some(*p),
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                if table == u32::from(RouteHeader::RT_TABLE_MAIN)
                    && r.header.kind == RouteType::Unicast
                {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// The neighbour entries, IPv4 and IPv6.
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>> {
        let answers = self.dump(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            "list neighbours",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .filter_map(|n| {
                let mut ip = None;
                let mut mac = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(IpAddr::V4(*v4));
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = Some(IpAddr::V6(*v6));
                        }
                        NeighbourAttribute::LinkLayerAddress(m) => mac = mac_of(m),
                        _ => {}
                    }
                }
                Some(Neighbour {
                    index: n.header.ifindex,
                    ip: ip?,
                    mac: mac?,
                    permanent: n.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }

    /// Renames, resizes or brings up or down interface `index` (a rename needs it down).
    pub fn set_link(&mut self, index: u32, change: &LinkChange) -> Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        if let Some(up) = change.up {
            link.header.change_mask = LinkFlags::Up;
            if up {
                link.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = &change.name {
            link.attributes.push(LinkAttribute::IfName(name.clone()));
        }
        if let Some(mtu) = change.mtu {
            link.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(
            RouteNetlinkMessage::SetLink(link),
            0,
            &format!("set link {index} ({change:?})"),
        )
    }

    /// Sets the interface named `name` up (`ip link set NAME up`).
    pub fn set_up_by_name(&mut self, name: &str) -> Result<()> {
        let mut link = LinkMessage::default();
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        self.request(
            RouteNetlinkMessage::SetLink(link),
            0,
            &format!("set {name} up"),
        )
    }

    /// `ip address add IP/PREFIX dev INDEX`.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut a = AddressMessage::default();
        a.header.family = family_of(ip);
        a.header.prefix_len = prefix;
        a.header.index = index;
        a.attributes.push(AddressAttribute::Local(ip));
        a.attributes.push(AddressAttribute::Address(ip));
        self.request(
            RouteNetlinkMessage::NewAddress(a),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {ip}/{prefix} to link {index}"),
        )
    }

    /// `ip route add` of `route` in the main table, through interface `index`.
    pub fn add_route(&mut self, index: u32, route: &Route) -> Result<()> {
        let mut r = RouteMessage::default();
        r.header.address_family = if route.ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.protocol = RouteProtocol::Boot;
        r.header.kind = RouteType::Unicast;
        r.header.scope = if route.link_scope || route.gateway.is_none() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        if let Some((ip, prefix)) = route.destination {
            r.header.destination_prefix_length = prefix;
            r.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gw) = route.gateway {
            r.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = route.source {
            r.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        if let Some(metric) = route.metric {
            r.attributes.push(RouteAttribute::Priority(metric));
        }
        r.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(r),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add route {route:?}"),
        )
    }

    /// A permanent neighbour entry (`ip neigh add IP lladdr MAC nud permanent dev INDEX`).
    pub fn add_neighbour(&mut self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        let mut n = NeighbourMessage::default();
        n.header.family = family_of(ip);
        n.header.ifindex = index;
        n.header.state = NeighbourState::Permanent;
        n.header.kind = RouteType::Unspec;
        n.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        n.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(n),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add neighbour {ip} to link {index}"),
        )
    }

    fn ingress_qdisc(index: u32) -> TcMessage {
        let mut q = TcMessage::with_index(index as i32);
        q.header.parent = TcHandle::INGRESS;
        q.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        q.attributes.push(TcAttribute::Kind("ingress".into()));
        q
    }

    /// `tc qdisc add dev INDEX ingress`. An interface that has one already is an error
    /// (`EEXIST`): somebody else's filters may hang there.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(Self::ingress_qdisc(index)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add an ingress qdisc to link {index}"),
        )
    }

    /// `tc qdisc del dev INDEX ingress`, with its filters. One already gone is no error.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        match self.request(
            RouteNetlinkMessage::DelQueueDiscipline(Self::ingress_qdisc(index)),
            0,
            &format!("delete the ingress qdisc of link {index}"),
        ) {
            Err(RtnlError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
                ) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Every frame that arrives on `from` leaves through `to`: `tc filter add dev FROM parent
    /// ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev TO` (Kata's
    /// `tcfilter` model). `u32` with one key that matches anything, not `matchall`: every kernel
    /// with tc has `u32`, and some (this machine's) lack `cls_matchall`. `from` needs its
    /// ingress qdisc first.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<()> {
        let mut f = TcMessage::with_index(from as i32);
        f.header.parent = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        // tcm_info: the filter's priority (high 16 bits) and protocol (low 16, network order).
        f.header.info = (1 << 16) | u32::from(ETH_P_ALL_BE);
        f.attributes.push(TcAttribute::Kind("u32".into()));
        let mut generic = TcActionGeneric::default();
        generic.action = TcActionType::Stolen;
        let mut parms = TcMirror::default();
        parms.generic = generic;
        parms.eaction = TcMirrorActionType::EgressRedir;
        parms.ifindex = to;
        let mut mirred = TcAction::default();
        mirred.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                parms,
            ))]),
        ];
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        f.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![mirred])),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(f),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("redirect what arrives on link {from} to link {to}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eth_p_all_is_in_network_order() {
        assert_eq!(ETH_P_ALL_BE.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn the_loopback_of_this_namespace_is_listed() {
        // Any namespace has `lo`, and reading needs no privilege.
        let mut r = Rtnl::open().unwrap();
        let lo = r.links().unwrap().into_iter().find(|l| l.loopback);
        let lo = lo.expect("a loopback interface");
        assert_eq!(lo.name, "lo");
        assert!(lo.mtu > 0);
        assert_eq!(r.link("lo").unwrap(), Some(lo));
    }
}
