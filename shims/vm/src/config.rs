//! The vm runtime's options: switchyardd's `[runtimes.vm.options]` (or CRI's `ConfigPath`),
//! read by the shim from the runtime options of the first task of a sandbox.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use yard_shim_kit::protos::protobuf::well_known_types::any::Any;
use yard_shim_kit::{Error, Result};

use crate::virt::{AccelPreference, BackendPreference};

/// Where `scripts/guest` installs the guest kernel and the agent's initramfs.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/switchyard/guest";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// The guest kernel (an uncompressed `vmlinux` from `guest/kernel/build.sh`).
    pub kernel: PathBuf,
    /// The initramfs holding the agent (`guest/agent/build-initrd.sh`).
    pub initrd: PathBuf,
    /// The QEMU binary (a name is looked up on PATH).
    pub qemu: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `auto` (the built-in VMM where KVM has hardware virtualization, QEMU otherwise),
    /// `builtin` or `qemu`.
    pub backend: BackendPreference,
    /// QEMU's accelerator: `auto` (KVM where hardware virtualization is usable, TCG otherwise),
    /// `kvm` or `tcg`.
    pub accel: AccelPreference,
    /// How long the guest may take from QEMU's start to the agent's ready banner.
    pub boot_timeout_ms: u64,
    /// Read-only rootfs images, cached by digest, and per-sandbox shares.
    pub cache_dir: PathBuf,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// The agent's debug logs on the guest console (`console.log` in the VM's state dir).
    pub debug: bool,
    /// Put every task of this runtime in one sandbox (VM) per namespace (the group
    /// annotations win).
    pub group: String,
    /// Run containers whose spec asks for security settings the guest cannot enforce
    /// (`linux.seccomp`, AppArmor and SELinux labels), with a warning, instead of refusing
    /// them: the VM is then their only boundary.
    pub allow_unenforced_security: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kernel: PathBuf::from(DEFAULT_GUEST_DIR).join("vmlinux"),
            initrd: PathBuf::from(DEFAULT_GUEST_DIR).join("initrd.img"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            vcpus: 1,
            memory_mib: 256,
            backend: BackendPreference::Auto,
            accel: AccelPreference::Auto,
            boot_timeout_ms: 20_000,
            cache_dir: PathBuf::from("/var/cache/switchyard/vm"),
            kernel_args: Vec::new(),
            debug: false,
            group: String::new(),
            allow_unenforced_security: false,
        }
    }
}

/// Smallest guest that boots the kernel and the agent with room for a container.
pub const MIN_MEMORY_MIB: u32 = 64;

impl Options {
    pub fn from_any(any: Option<&Any>) -> Result<Options> {
        let o: Options = yard_shim_kit::bundle::options_from_any(any)?;
        o.validate()?;
        Ok(o)
    }

    pub fn from_toml(text: &str) -> Result<Options> {
        let o: Options = yard_shim_kit::bundle::options_from_toml(text)?;
        o.validate()?;
        Ok(o)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("options: {m}")));
        if self.vcpus == 0 || self.vcpus > 64 {
            return bad(format!("vcpus = {}: must be 1 to 64", self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return bad(format!(
                "memory_mib = {}: the guest needs at least {MIN_MEMORY_MIB}",
                self.memory_mib
            ));
        }
        if self.boot_timeout_ms == 0 {
            return bad("boot_timeout_ms = 0: must be positive".into());
        }
        if let Some(a) = self
            .kernel_args
            .iter()
            .find(|a| a.contains(char::is_whitespace))
        {
            return bad(format!(
                "kernel_args: {a:?} contains whitespace (one argument each)"
            ));
        }
        Ok(())
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Options::from_toml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        assert_eq!(Options::from_toml("").ok(), Some(Options::default()));
        let o = Options::from_toml("vcpus = 2\nmemory_mib = 512\naccel = \"tcg\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (o.vcpus, o.memory_mib, o.accel),
            (2, 512, AccelPreference::Tcg)
        );
        assert!(err("vcpu = 2\n").contains("vcpu"));
        assert!(err("accel = \"fast\"\n").contains("fast"));
        assert!(err("backend = \"firecracker\"\n").contains("firecracker"));
        assert_eq!(
            Options::from_toml("backend = \"builtin\"\n")
                .map(|o| o.backend)
                .ok(),
            Some(BackendPreference::Builtin)
        );
        assert!(err("memory_mib = 16\n").contains("memory_mib = 16"));
        assert!(err("vcpus = 0\n").contains("vcpus = 0"));
        assert!(err("kernel_args = [\"a b\"]\n").contains("kernel_args"));
    }
}
