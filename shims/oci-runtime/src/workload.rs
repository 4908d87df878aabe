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
