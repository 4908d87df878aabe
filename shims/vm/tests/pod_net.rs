//! Issue 20: the host side of a VM pod's network against real network namespaces (root and
//! iproute2; skipped with a printed reason otherwise): `PodNet::attach` reads the pod's `eth0`,
//! makes the tap and the tc redirects; bad namespaces fail naming what is wrong and leave no
//! tap or qdisc, and one without `eth0` gets no device; detach and the last fd take everything
//! away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use containerd_shim_yard_vm_v1::engine::net::{PodNet, TAP};
use switchyard_tests::{is_root, require, unique_id, which};

/// A network namespace of the test's own (`ip netns add`), removed on drop with what is in it.
struct Ns(String);

impl Ns {
    fn new() -> Ns {
        let name = unique_id("yard-podnet");
        ip(&["netns", "add", &name]);
        Ns(name)
    }

    fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.0).into()
    }

    /// `ip -n NS ARGS`, its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.0.as_str()];
        a.extend(args);
        ip(&a)
    }

    fn tc(&self, args: &[&str]) -> String {
        run(
            "ip",
            &[&["netns", "exec", self.0.as_str(), "tc"], args].concat(),
        )
    }

    /// A veth pair inside: `eth0` and its peer `peer0`, both up.
    fn with_eth0(self) -> Ns {
        self.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["link", "set", "peer0", "up"]);
        self
    }

    fn links(&self) -> String {
        self.ip(&["-o", "link"])
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

fn gate() -> bool {
    require(is_root(), "needs root (network namespaces, taps, tc)")
        && require(which("ip").is_some(), "needs ip (iproute2)")
        && require(which("tc").is_some(), "needs tc (iproute2)")
        && require(
            std::path::Path::new("/dev/net/tun").exists(),
            "needs /dev/net/tun",
        )
}

#[test]
fn issue20_eth0_is_mirrored_to_a_tap_and_everything_goes_with_the_vm() {
    if !gate() {
        return;
    }
    let ns = Ns::new().with_eth0();
    ns.ip(&["addr", "add", "10.251.3.7/24", "dev", "eth0"]);
    ns.ip(&["addr", "add", "fd00:251::7/64", "dev", "eth0", "nodad"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.251.3.1",
        "dev",
        "eth0",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/16",
        "via",
        "10.251.3.1",
        "dev",
        "eth0",
        "metric",
        "7",
    ]);
    ns.ip(&[
        "neigh",
        "add",
        "10.251.3.1",
        "lladdr",
        "0a:00:00:00:00:01",
        "nud",
        "permanent",
        "dev",
        "eth0",
    ]);
    ns.ip(&["link", "set", "eth0", "mtu", "1450"]);

    let net = PodNet::attach(&ns.path(), Some("web-0".into()))
        .unwrap()
        .expect("eth0 is there");
    let itf = &net.config.interfaces[0];
    assert_eq!(itf.name, "eth0");
    assert_eq!(itf.mtu, 1450);
    assert_eq!(net.device.mtu, 1450);
    assert_eq!(itf.mac, net.device.mac.to_vec());
    assert!(ns.links().contains(&format!(
        "link/ether {}",
        containerd_shim_yard_vm_v1::engine::net::format_mac(&itf.mac)
    )));
    assert_eq!(itf.addresses, ["10.251.3.7/24", "fd00:251::7/64"]);
    let routes: Vec<(&str, &str, u32)> = net
        .config
        .routes
        .iter()
        .map(|r| (r.destination.as_str(), r.gateway.as_str(), r.metric))
        .collect();
    // The kernel's own routes for the addresses (and IPv6 link-local ones) are left out.
    assert_eq!(
        routes,
        [("", "10.251.3.1", 0), ("10.99.0.0/16", "10.251.3.1", 7)]
    );
    assert_eq!(net.config.neighbours.len(), 1);
    assert_eq!(net.config.neighbours[0].ip, "10.251.3.1");
    assert_eq!(net.config.hostname, "web-0");

    // The tap, up with eth0's MTU, and a redirect each way.
    let links = ns.links();
    assert!(links.contains(&format!("{TAP}: <")), "{links}");
    assert!(ns.ip(&["-o", "link", "show", TAP]).contains("mtu 1450"));
    for dev in ["eth0", TAP] {
        let filters = ns.tc(&["filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("mirred (Egress Redirect to device"),
            "{dev}: {filters}"
        );
    }
    // A second VM in the same namespace is refused and leaves the first's plumbing alone.
    let e = PodNet::attach(&ns.path(), None)
        .err()
        .expect("one VM per pod");
    assert!(e.to_string().contains("create the tap tap0_yard"), "{e}");
    assert!(
        ns.tc(&["filter", "show", "dev", "eth0", "ingress"])
            .contains("mirred")
    );

    net.detach();
    assert!(!ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    drop(net);
    // The tap was ours alone: it went with the fd.
    assert!(!ns.links().contains(TAP), "{}", ns.links());
    // eth0 and its addresses are the CNI plugins' and stay.
    assert!(
        ns.ip(&["-o", "addr", "show", "eth0"])
            .contains("10.251.3.7/24")
    );
}

#[test]
fn issue20_a_namespace_without_an_address_is_refused_and_left_as_it_was() {
    if !gate() {
        return;
    }
    // No eth0 (not a CNI pod's namespace): no network device, and nothing made.
    let bare = Ns::new();
    assert!(PodNet::attach(&bare.path(), None).unwrap().is_none());
    assert!(!bare.links().contains(TAP));

    let no_address = Ns::new().with_eth0();
    let e = PodNet::attach(&no_address.path(), None)
        .err()
        .expect("no address");
    let msg = e.to_string();
    assert!(
        msg.contains("eth0 has no IPv4 and no IPv6 address"),
        "{msg}"
    );
    assert!(!no_address.links().contains(TAP));
    assert!(
        !no_address
            .tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress")
    );

    // An ingress qdisc somebody else put on eth0 is not taken over, nor removed.
    let taken = Ns::new().with_eth0();
    taken.ip(&["addr", "add", "10.251.4.7/24", "dev", "eth0"]);
    taken.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    let e = PodNet::attach(&taken.path(), None)
        .err()
        .expect("qdisc taken");
    assert!(e.to_string().contains("mirror eth0 to the tap"), "{e}");
    assert!(
        taken
            .tc(&["qdisc", "show", "dev", "eth0"])
            .contains("ingress")
    );
    assert!(!taken.links().contains(TAP));

    let missing = std::path::Path::new("/run/netns/yard-podnet-missing");
    let e = PodNet::attach(missing, None).err().expect("missing");
    assert!(
        e.to_string().contains("/run/netns/yard-podnet-missing"),
        "{e}"
    );
}
