//! A Wasm container's `wasi:http` port under switchyardd's CRI. CRI gives a runtime no
//! container ports, only the pod's `port_mappings` (which `portmap` publishes); when a Wasm
//! pod declares exactly one TCP mapping, its container port is where the wasm shim's listener
//! goes, inside the pod's network namespace, through the annotation the shim reads
//! (`io.switchyard.wasm.http-listen`). Otherwise (none, or several: which container serves
//! which is not said) the shim's own default stands (8080), and a container's own annotation
//! always wins. containerd's CRI passes the annotation on only where its runtime lists it, so
//! there the default stands.

use std::collections::HashMap;

use switchyard_api::cri::v1 as cri;

/// The wasm shim's runtime type.
pub const WASM_RUNTIME_TYPE: &str = "io.containerd.yard-wasm.v1";
/// The annotation the wasm shim takes a listener's address from.
pub const HTTP_LISTEN: &str = "io.switchyard.wasm.http-listen";

/// The listener address to annotate a Wasm container with, if the pod declares its port and
/// the container does not already say.
pub fn listen_annotation(
    sandbox: &cri::PodSandboxConfig,
    annotations: Option<&HashMap<String, String>>,
) -> Option<String> {
    if annotations.is_some_and(|a| a.contains_key(HTTP_LISTEN)) {
        return None;
    }
    let mut tcp = sandbox
        .port_mappings
        .iter()
        .filter(|p| p.protocol == cri::Protocol::Tcp as i32);
    match (tcp.next(), tcp.next()) {
        (Some(p), None) => u16::try_from(p.container_port)
            .ok()
            .filter(|port| *port > 0)
            .map(|port| format!("0.0.0.0:{port}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(protocol: cri::Protocol, container_port: i32) -> cri::PortMapping {
        cri::PortMapping {
            protocol: protocol as i32,
            container_port,
            host_port: 30080,
            host_ip: String::new(),
        }
    }

    #[test]
    fn issue20_one_tcp_mapping_is_the_listeners_port() {
        let mut pod = cri::PodSandboxConfig::default();
        assert_eq!(listen_annotation(&pod, None), None);
        pod.port_mappings = vec![mapping(cri::Protocol::Tcp, 9000)];
        assert_eq!(
            listen_annotation(&pod, None).as_deref(),
            Some("0.0.0.0:9000")
        );
        // UDP mappings are not the listener's.
        pod.port_mappings.push(mapping(cri::Protocol::Udp, 53));
        assert_eq!(
            listen_annotation(&pod, None).as_deref(),
            Some("0.0.0.0:9000")
        );
        // The container's own annotation wins.
        let own: HashMap<String, String> =
            [(HTTP_LISTEN.to_owned(), "0.0.0.0:7000".to_owned())].into();
        assert_eq!(listen_annotation(&pod, Some(&own)), None);
        // Two TCP ports: which one is the listener's is not said.
        pod.port_mappings.push(mapping(cri::Protocol::Tcp, 9001));
        assert_eq!(listen_annotation(&pod, None), None);
        // Out of range: left to the default (RunPodSandbox refused it already).
        pod.port_mappings = vec![mapping(cri::Protocol::Tcp, 70000)];
        assert_eq!(listen_annotation(&pod, None), None);
    }
}
