//! The last step in the container's process, right before `execve`: libcontainer's default
//! workload, plus what libcontainer 0.7 leaves out.
//!
//! - An absolute `args[0]` runs without `PATH` in the environment, as with runc (ctr sends no
//!   environment with `--rootfs`).
//! - The SELinux process label is set (libcontainer keeps `process.selinuxLabel` but never
//!   applies it); as with runc, nothing is done where SELinux is off.
//! - For exec, the container's seccomp filter. libcontainer's tenant builder rebuilds `linux`
//!   for the new process from namespaces, cgroup path, personality and time offsets only, so
//!   `linux.seccomp` never reaches the process. runc applies the container's filter to every
//!   exec; this does it here, in runc's order: without `no_new_privs`, loading a filter needs
//!   `CAP_SYS_ADMIN`, so the filter goes on before the capabilities are dropped (libcontainer
//!   is handed the process without capabilities, which leaves them for this step to drop); with
//!   it, the capabilities go first and the filter is the last thing before `execve`.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

use crate::spec::SpecError;

/// libcontainer's default workload with the additions above.
#[derive(Clone, Default)]
pub(crate) struct Workload {
    /// Applied first (exec only). A build without seccomp refuses to exec into a container
    /// that has a filter, so it never needs this.
    #[cfg(feature = "seccomp")]
    pub confine: Option<Confinement>,
}

/// What an exec'd process must get from its container that libcontainer does not apply.
#[cfg(feature = "seccomp")]
#[derive(Clone)]
pub(crate) struct Confinement {
    pub seccomp: oci_spec::runtime::LinuxSeccomp,
    /// Dropped here, not by libcontainer (see the module's documentation).
    pub capabilities: Option<oci_spec::runtime::LinuxCapabilities>,
    pub no_new_privs: bool,
}

impl Workload {
    /// The workload of an exec into a container with `seccomp`; `process` is what libcontainer
    /// gets (without capabilities when this step drops them).
    pub(crate) fn for_exec(
        seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
        process: &mut oci_spec::runtime::Process,
    ) -> Result<Workload, SpecError> {
        let Some(seccomp) = seccomp else {
            return Ok(Workload::default());
        };
        #[cfg(feature = "seccomp")]
        {
            if libcontainer::seccomp::is_notify(seccomp) {
                return Err(SpecError::SeccompNotifyOnExec);
            }
            let confine = Confinement {
                seccomp: seccomp.clone(),
                capabilities: process.capabilities().clone(),
                no_new_privs: process.no_new_privileges() == Some(true),
            };
            process.set_capabilities(None);
            Ok(Workload {
                confine: Some(confine),
            })
        }
        #[cfg(not(feature = "seccomp"))]
        {
            let _ = (seccomp, process);
            Err(SpecError::SeccompUnsupported)
        }
    }
}

impl Executor for Workload {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(label) = spec
            .process()
            .as_ref()
            .and_then(|p| p.selinux_label().as_deref())
            .filter(|l| !l.is_empty())
        {
            selinux_exec_label(label)?;
        }
        #[cfg(feature = "seccomp")]
        if let Some(c) = &self.confine {
            c.apply()?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        let absolute = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first())
            .is_some_and(|a| a.contains('/'));
        if !has_path && absolute {
            return Ok(());
        }
        DefaultExecutor {}.validate(spec)
    }
}

/// runc's `label.SetProcessLabel`: the label the next `execve` runs under.
fn selinux_exec_label(label: &str) -> Result<(), ExecutorError> {
    if !std::path::Path::new("/sys/fs/selinux/enforce").exists() {
        return Ok(());
    }
    std::fs::write("/proc/thread-self/attr/exec", label).map_err(|e| {
        ExecutorError::Other(format!(
            "process.selinuxLabel: set {label:?} for execve: {e}"
        ))
    })
}

#[cfg(feature = "seccomp")]
impl Confinement {
    fn apply(&self) -> Result<(), ExecutorError> {
        if self.no_new_privs {
            self.drop_capabilities()?;
            self.load_seccomp()
        } else {
            self.load_seccomp()?;
            self.drop_capabilities()
        }
    }

    fn drop_capabilities(&self) -> Result<(), ExecutorError> {
        let Some(caps) = &self.capabilities else {
            return Ok(());
        };
        let syscall = libcontainer::syscall::syscall::create_syscall();
        libcontainer::capabilities::drop_privileges(caps, syscall.as_ref()).map_err(|e| {
            ExecutorError::Other(format!(
                "process.capabilities: drop to the container's: {}",
                switchyard_base::chain(&e)
            ))
        })
    }

    fn load_seccomp(&self) -> Result<(), ExecutorError> {
        match libcontainer::seccomp::initialize_seccomp(&self.seccomp) {
            // Refused before the fork (`SpecError::SeccompNotifyOnExec`), so there is no fd.
            Ok(_) => Ok(()),
            Err(e) => Err(ExecutorError::Other(format!(
                "linux.seccomp: load the container's filter: {}",
                switchyard_base::chain(&e)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> oci_spec::runtime::Process {
        serde_json::from_value(serde_json::json!({
            "args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true
        }))
        .unwrap()
    }

    fn seccomp(action: &str) -> oci_spec::runtime::LinuxSeccomp {
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "listenerPath": "/run/listener.sock",
            "syscalls": [{"names": ["sethostname"], "action": action}]
        }))
        .unwrap()
    }

    #[test]
    fn without_a_filter_libcontainer_confines_the_exec_alone() {
        let mut p = process();
        let w = Workload::for_exec(None, &mut p).unwrap();
        assert_eq!(p, process());
        #[cfg(feature = "seccomp")]
        assert!(w.confine.is_none());
        let _ = w;
    }

    #[cfg(feature = "seccomp")]
    #[test]
    fn with_a_filter_the_workload_loads_it_and_drops_the_capabilities() {
        let mut p = process();
        let w = Workload::for_exec(Some(&seccomp("SCMP_ACT_ERRNO")), &mut p).unwrap();
        let c = w.confine.unwrap();
        assert!(
            p.capabilities().is_none(),
            "libcontainer must not drop them first"
        );
        assert_eq!(&c.capabilities, process().capabilities());
        assert!(c.no_new_privs);
        let e = Workload::for_exec(Some(&seccomp("SCMP_ACT_NOTIFY")), &mut process());
        assert!(matches!(e, Err(SpecError::SeccompNotifyOnExec)));
    }

    #[cfg(not(feature = "seccomp"))]
    #[test]
    fn without_libseccomp_an_exec_into_a_filtered_container_is_refused() {
        let e = Workload::for_exec(Some(&seccomp("SCMP_ACT_ERRNO")), &mut process());
        assert!(matches!(e, Err(SpecError::SeccompUnsupported)));
    }
}
