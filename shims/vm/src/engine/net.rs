//! A VM pod on the pod network (docs/networking.md), as Kata's `tcfilter` model has it: the
//! pod's network namespace keeps the CNI interface (`eth0`, with its addresses, so the plugins'
//! CHECK and DEL find what they made); a tap made beside it in that namespace is the guest's
//! virtio-net device; tc redirects every frame that arrives on one to the other, both ways, so
//! any CNI plugin works unchanged. The guest gets `eth0`'s MAC, MTU, addresses, routes and
//! permanent neighbours through the agent ([`PodNet::config`]), so to the pod's neighbours the
//! guest *is* `eth0`.
//!
//! The tap is not persistent: it lives while the VMM holds its fd and goes with the VM. The
//! ingress qdiscs are removed by [`PodNet::detach`] (and go with `eth0` at CNI DEL anyway).

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use switchyard_rtnl::{Rtnl, RtnlError};
use yard_agent_protocol as proto;
use yard_shim_kit::{Error, Result};

use crate::hypervisor::NetDevice;

/// The pod's interface, as CRI names it for the CNI plugins.
pub const POD_INTERFACE: &str = "eth0";
/// The tap beside it in the pod's namespace.
pub const TAP: &str = "tap0_yard";

/// The network namespace a sandbox's spec names by path (a pod's, made by containerd's CRI or
/// switchyardd's): `None` for a task without one (it gets no network device).
pub fn pod_netns(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// The pod network of a booted (or booting) VM.
pub struct PodNet {
    pub netns: PathBuf,
    /// The tap's fd, for the VMM.
    pub device: NetDevice,
    /// What the agent is to configure.
    pub config: proto::NetworkConfig,
    /// The index of the pod's `eth0`, whose redirect [`Plumber::detach`] removes.
    pub eth: u32,
}

/// Makes and undoes a VM's pod network: [`HostPlumber`], or a recorder in tests.
pub trait Plumber: Send + Sync {
    /// Reads the pod's `eth0` in the namespace at `netns` and mirrors it to a new tap there;
    /// `None` where the namespace has no `eth0`. Blocking. On an error nothing is left.
    fn attach(&self, netns: &Path, hostname: Option<String>) -> Result<Option<PodNet>>;
    /// Removes what [`Plumber::attach`] made but the tap (it goes with its fds). Blocking.
    fn detach(&self, net: &PodNet);
}

/// The real thing: netlink in the pod's namespace.
pub struct HostPlumber;

impl Plumber for HostPlumber {
    fn attach(&self, netns: &Path, hostname: Option<String>) -> Result<Option<PodNet>> {
        PodNet::attach(netns, hostname)
    }

    fn detach(&self, net: &PodNet) {
        net.detach();
    }
}

fn failed(netns: &Path, what: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!("pod network namespace {}: {what}", netns.display()))
}

fn netlink(netns: &Path) -> impl Fn(RtnlError) -> Error + '_ {
    move |e| failed(netns, yard_shim_kit::error::chain(&e))
}

fn cidr(ip: IpAddr, prefix: u8) -> String {
    format!("{ip}/{prefix}")
}

/// What of the namespace the guest gets: `eth0`'s global addresses, the main table's routes
/// through it (not the ones the kernel makes for an address, nor IPv6 link-local or multicast
/// ones, which the guest makes itself) and its permanent neighbours. `None` for a namespace
/// without `eth0`: not a CNI pod's (CRI always names the pod's interface `eth0`), such as one a
/// `ctr run --with-ns` names, whose VM then gets no network device, as before, and as Kata boots
/// a VM for a namespace without interfaces.
fn read_config(
    rtnl: &mut Rtnl,
    netns: &Path,
) -> Result<Option<(switchyard_rtnl::Link, proto::NetworkConfig)>> {
    let links = rtnl.links().map_err(netlink(netns))?;
    let Some(eth) = links.iter().find(|l| l.name == POD_INTERFACE).cloned() else {
        tracing::info!(
            netns = %netns.display(),
            interfaces = links.len(),
            "no {POD_INTERFACE} in the namespace: the VM gets no network device"
        );
        return Ok(None);
    };
    let Some(mac) = eth.mac else {
        return Err(failed(
            netns,
            format!("{POD_INTERFACE} has no Ethernet address (not an Ethernet-like interface)"),
        ));
    };
    let addresses: Vec<String> = rtnl
        .addresses()
        .map_err(netlink(netns))?
        .into_iter()
        .filter(|a| a.index == eth.index && a.global)
        .map(|a| cidr(a.ip, a.prefix))
        .collect();
    if addresses.is_empty() {
        return Err(failed(
            netns,
            format!(
                "{POD_INTERFACE} has no IPv4 and no IPv6 address: nothing to give the guest \
                 (did the CNI ADD run?)"
            ),
        ));
    }
    if addresses.len() > proto::MAX_NET_ADDRESSES {
        return Err(failed(
            netns,
            format!(
                "{POD_INTERFACE} has {} addresses (at most {})",
                addresses.len(),
                proto::MAX_NET_ADDRESSES
            ),
        ));
    }
    let routes: Vec<proto::Route> = rtnl
        .routes()
        .map_err(netlink(netns))?
        .into_iter()
        .filter(|r| r.oif == Some(eth.index) && !r.kernel)
        .filter(|r| match r.destination {
            Some((IpAddr::V6(d), _)) => !(d.is_unicast_link_local() || d.is_multicast()),
            _ => true,
        })
        .map(|r| proto::Route {
            destination: r.destination.map(|(ip, p)| cidr(ip, p)).unwrap_or_default(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: POD_INTERFACE.into(),
            source: r.source.map(|s| s.to_string()).unwrap_or_default(),
            metric: r.metric.unwrap_or(0),
            ipv6: r.ipv6,
            ..Default::default()
        })
        .collect();
    if routes.len() > proto::MAX_NET_ROUTES {
        return Err(failed(
            netns,
            format!(
                "{} routes through {POD_INTERFACE} (at most {})",
                routes.len(),
                proto::MAX_NET_ROUTES
            ),
        ));
    }
    let neighbours: Vec<proto::Neighbour> = rtnl
        .neighbours()
        .map_err(netlink(netns))?
        .into_iter()
        .filter(|n| n.index == eth.index && n.permanent)
        .map(|n| proto::Neighbour {
            ip: n.ip.to_string(),
            mac: n.mac.to_vec(),
            device: POD_INTERFACE.into(),
            ..Default::default()
        })
        .collect();
    if neighbours.len() > proto::MAX_NET_NEIGHBOURS {
        return Err(failed(
            netns,
            format!(
                "{} permanent neighbours (at most {})",
                neighbours.len(),
                proto::MAX_NET_NEIGHBOURS
            ),
        ));
    }
    let config = proto::NetworkConfig {
        interfaces: vec![proto::Interface {
            name: POD_INTERFACE.into(),
            mac: mac.to_vec(),
            mtu: eth.mtu,
            addresses,
            ..Default::default()
        }],
        routes,
        neighbours,
        ..Default::default()
    };
    Ok(Some((eth, config)))
}

/// Makes the tap and the redirects; on an error undoes what it did.
fn plumb(rtnl: &mut Rtnl, netns: &Path, eth: &switchyard_rtnl::Link) -> Result<OwnedFd> {
    let tap = crate::sys::open_tap(TAP).map_err(|e| {
        failed(
            netns,
            format!("create the tap {TAP} for the VM (is /dev/net/tun there, and no other VM in this pod?): {e}"),
        )
    })?;
    let tap_index = rtnl
        .link(TAP)
        .map_err(netlink(netns))?
        .ok_or_else(|| failed(netns, format!("the tap {TAP} vanished after it was made")))?
        .index;
    // The eth0 qdisc is removed on an error only if this call added it: one that was there
    // before (EEXIST) is somebody else's.
    let mut ours = false;
    let mut steps = || -> std::result::Result<(), RtnlError> {
        rtnl.set_link(
            tap_index,
            &switchyard_rtnl::LinkChange {
                mtu: Some(eth.mtu),
                up: Some(true),
                ..Default::default()
            },
        )?;
        rtnl.add_ingress_qdisc(eth.index)?;
        ours = true;
        rtnl.add_ingress_qdisc(tap_index)?;
        rtnl.redirect_ingress(eth.index, tap_index)?;
        rtnl.redirect_ingress(tap_index, eth.index)
    };
    if let Err(e) = steps() {
        // The tap's qdisc goes with the tap (its fd is dropped below).
        if ours {
            let _ = rtnl.del_ingress_qdisc(eth.index);
        }
        return Err(failed(
            netns,
            format!(
                "mirror {POD_INTERFACE} to the tap {TAP} with tc: {}",
                yard_shim_kit::error::chain(&e)
            ),
        ));
    }
    Ok(tap)
}

impl PodNet {
    /// Reads `eth0` of the pod's namespace at `netns`, makes the tap and the redirects there;
    /// `None` for a namespace without `eth0` ([`read_config`]). Blocking (a thread joins the
    /// namespace): call it off the async threads.
    pub fn attach(netns: &Path, hostname: Option<String>) -> Result<Option<PodNet>> {
        let ns = open_netns(netns)?;
        let path = netns.to_owned();
        let plumbed = ns
            .run_in(move || -> Result<_> {
                let mut rtnl = Rtnl::open().map_err(netlink(&path))?;
                let Some((eth, config)) = read_config(&mut rtnl, &path)? else {
                    return Ok(None);
                };
                let tap = plumb(&mut rtnl, &path, &eth)?;
                Ok(Some((eth, config, tap)))
            })
            .map_err(|e| failed(netns, yard_shim_kit::error::chain(&e)))??;
        let Some((eth, mut config, tap)) = plumbed else {
            return Ok(None);
        };
        config.hostname = hostname.unwrap_or_default();
        let mac = eth.mac.unwrap_or_default();
        tracing::info!(
            netns = %netns.display(),
            mac = %format_mac(&mac),
            addresses = ?config.interfaces.first().map(|i| i.addresses.clone()),
            routes = config.routes.len(),
            "the pod's {POD_INTERFACE} is mirrored to the VM's tap"
        );
        Ok(Some(PodNet {
            netns: netns.to_owned(),
            device: NetDevice {
                tap: Arc::new(tap),
                mac,
                mtu: eth.mtu,
            },
            config,
            eth: eth.index,
        }))
    }

    /// Removes the redirect from `eth0` (the tap's goes with the tap). A namespace or
    /// interface already gone is no error. Blocking.
    pub fn detach(&self) {
        let Ok(ns) = open_netns(&self.netns) else {
            return;
        };
        let eth = self.eth;
        let r = ns.run_in(move || -> std::result::Result<(), RtnlError> {
            Rtnl::open()?.del_ingress_qdisc(eth)
        });
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                netns = %self.netns.display(),
                error = %yard_shim_kit::error::chain(&e),
                "cannot remove the pod interface's redirect to the VM"
            ),
            Err(e) => {
                tracing::debug!(netns = %self.netns.display(), error = %e, "pod network namespace gone")
            }
        }
    }
}

fn open_netns(netns: &Path) -> Result<switchyard_cni::Netns> {
    let (Some(dir), Some(name)) = (netns.parent(), netns.file_name().and_then(|n| n.to_str()))
    else {
        return Err(failed(netns, "not a path to a namespace file"));
    };
    switchyard_cni::Netns::at(dir, name).map_err(|e| failed(netns, e))
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_namespace_path_comes_from_the_spec() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]}
        }))
        .unwrap();
        assert_eq!(
            pod_netns(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "network"}]}
        }))
        .unwrap();
        assert_eq!(pod_netns(&spec), None);
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0, 1, 0xfe, 0xff]),
            "0a:58:00:01:fe:ff"
        );
    }
}
