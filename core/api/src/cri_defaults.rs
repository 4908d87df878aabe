//! The CRI requests a client makes when its user says little, as crictl's defaults make them.
//! One home for `yard cri` and the tests that drive CRI runtimes.

use crate::cri::v1 as cri;

/// A pod sandbox config as crictl's defaults make one: the given metadata, hostname and log
/// directory, the pod's own network and IPC namespaces and each container's own PID namespace.
pub fn pod_config(
    metadata: cri::PodSandboxMetadata,
    hostname: &str,
    log_directory: &str,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(metadata),
        hostname: hostname.to_owned(),
        log_directory: log_directory.to_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
