//! What plugins print: the ADD result (spec 0.3.x/0.4.0 and 1.0.0, which differ only in the
//! `version` field of an IP, gone in 1.0.0) and the error result of a failed call.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::SUPPORTED_VERSIONS;

/// Error while reading a plugin's result.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("not a CNI result")]
    Json(#[source] serde_json::Error),
    #[error("cniVersion {0:?} is not one this crate reads")]
    Version(String),
    #[error("ips[{ip}] names interface {index}, but there are {count} interfaces")]
    InterfaceIndex {
        ip: usize,
        index: usize,
        count: usize,
    },
}

/// An ADD result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The netns path for an interface inside the container; absent for host-side ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` or `"6"` in 0.3.x/0.4.0 results; not in 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

impl CniResult {
    /// Parses and checks a result (version, interface indexes).
    pub fn from_value(value: serde_json::Value) -> Result<CniResult, ResultError> {
        let r: CniResult = serde_json::from_value(value).map_err(ResultError::Json)?;
        if !SUPPORTED_VERSIONS.contains(&r.cni_version.as_str()) {
            return Err(ResultError::Version(r.cni_version));
        }
        for (ip, cfg) in r.ips.iter().enumerate() {
            if let Some(index) = cfg.interface
                && index >= r.interfaces.len()
            {
                return Err(ResultError::InterfaceIndex {
                    ip,
                    index,
                    count: r.interfaces.len(),
                });
            }
        }
        Ok(r)
    }

    /// The addresses of the container-side interface `ifname` (one with a `sandbox`): the pod IPs
    /// when `ifname` is the pod's interface.
    pub fn sandbox_ips(&self, ifname: &str) -> Vec<&IpConfig> {
        self.ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .and_then(|i| self.interfaces.get(i))
                    .is_some_and(|itf| itf.name == ifname && itf.sandbox.is_some())
            })
            .collect()
    }
}

/// A plugin's error result (spec: "Error"), printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorResult {
    #[serde(default, rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// An address with its prefix length, `10.88.0.2/24` or `fd00::2/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A string that is not `ADDRESS/PREFIX`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an address with a prefix length")]
pub struct BadPrefix(String);

impl FromStr for IpPrefix {
    type Err = BadPrefix;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPrefix(s.to_owned());
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(bad());
        }
        Ok(IpPrefix { addr, prefix_len })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What Debian's bridge plugin prints for a 0.4.0 config.
    const BRIDGE_040: &str = r#"{
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "yard0", "mac": "1a:2b:3c:4d:5e:6f"},
            {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "02:42:0a:58:00:02", "sandbox": "/run/netns/pod"}
        ],
        "ips": [{"version": "4", "interface": 2, "address": "10.88.0.2/24", "gateway": "10.88.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    }"#;

    /// The same for 1.0.0 (no `version`), with IPv6, a route gateway and DNS.
    const BRIDGE_100: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "yard0", "mac": "1a:2b:3c:4d:5e:6f"},
            {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "02:42:0a:58:00:02", "sandbox": "/run/netns/pod"}
        ],
        "ips": [
            {"interface": 2, "address": "10.88.0.2/24", "gateway": "10.88.0.1"},
            {"interface": 2, "address": "fd00:88::2/64"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.88.0.1"], "search": ["svc.local"]}
    }"#;

    fn parse(s: &str) -> CniResult {
        CniResult::from_value(serde_json::from_str(s).unwrap()).unwrap()
    }

    #[test]
    fn parses_a_040_result() {
        let r = parse(BRIDGE_040);
        assert_eq!(r.cni_version, "0.4.0");
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.interfaces[2].sandbox.as_deref(), Some("/run/netns/pod"));
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        assert_eq!(r.ips[0].address.to_string(), "10.88.0.2/24");
        assert_eq!(r.ips[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r.routes[0].gw, None);
        assert_eq!(r.dns, Dns::default());
        let pod: Vec<_> = r.sandbox_ips("eth0").iter().map(|i| i.address).collect();
        assert_eq!(pod, ["10.88.0.2/24".parse().unwrap()]);
        assert!(r.sandbox_ips("yard0").is_empty());
    }

    #[test]
    fn parses_a_100_result() {
        let r = parse(BRIDGE_100);
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].version, None);
        assert_eq!(
            r.ips[1].address.addr,
            "fd00:88::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(r.ips[1].address.prefix_len, 64);
        assert_eq!(r.routes[0].gw, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(r.dns.nameservers, ["10.88.0.1"]);
        assert_eq!(r.dns.search, ["svc.local"]);
        assert_eq!(r.sandbox_ips("eth0").len(), 2);
        // Serializing gives the same result back (the cache relies on it only for its own
        // entries, which keep the plugin's JSON as it was).
        let again = CniResult::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn loopbacks_result_has_no_sandbox_ip_for_eth0() {
        let r = parse(
            r#"{"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": "/x"}],
                "ips": [{"interface": 0, "address": "127.0.0.1/8"}]}"#,
        );
        assert!(r.sandbox_ips("eth0").is_empty());
        assert_eq!(r.sandbox_ips("lo").len(), 1);
    }

    #[test]
    fn bad_results_are_refused() {
        let cases = [
            (
                json!({"cniVersion": "0.2.0", "ip4": {}}),
                "cniVersion \"0.2.0\"",
            ),
            (json!({"interfaces": []}), "not a CNI result"),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1"}]}),
                "not a CNI result",
            ),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/33"}]}),
                "not a CNI result",
            ),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/8", "interface": 1}]}),
                "ips[0] names interface 1, but there are 0 interfaces",
            ),
            (json!([]), "not a CNI result"),
        ];
        for (v, want) in cases {
            let e = CniResult::from_value(v.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn parses_error_results() {
        let e: ErrorResult = serde_json::from_str(
            r#"{"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config", "details": "x"}"#,
        )
        .unwrap();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (7, "invalid network config", "x")
        );
        // Debian's plugins leave out `details` when it is empty.
        let e: ErrorResult = serde_json::from_str(r#"{"code": 999, "msg": "boom"}"#).unwrap();
        assert_eq!(e.details, "");
    }

    #[test]
    fn prefixes_parse_and_print() {
        for s in ["10.88.0.2/24", "fd00::1/128", "0.0.0.0/0"] {
            assert_eq!(s.parse::<IpPrefix>().unwrap().to_string(), s);
        }
        for s in ["10.88.0.2", "10.88.0.2/", "x/24", "::1/129", "1.2.3.4/-1"] {
            assert!(s.parse::<IpPrefix>().is_err(), "{s}");
        }
    }
}
