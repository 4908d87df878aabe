//! Prerequisite gates: a test that needs root, a program, the guest kernel or KVM checks with
//! [`require`], which prints why it skips, or fails under `SWITCHYARD_REQUIRE_ALL=1` (CI sets it,
//! so a missing prerequisite cannot pass silently).

use std::path::{Path, PathBuf};

pub use switchyard_base::gate::{is_root, require};

/// Root, and the named programs on PATH.
pub fn require_root_and(programs: &[&str]) -> bool {
    if !require(is_root(), "needs root (namespaces, cgroups, mounts)") {
        return false;
    }
    programs
        .iter()
        .all(|p| require(which(p).is_some(), &format!("needs {p} on PATH")))
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Where `scripts/guest` installs the microVM guest (`vmlinux`, `initrd.img`):
/// `$SWITCHYARD_GUEST_DIR`, default `/var/lib/switchyard/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/switchyard/guest"))
}

/// The installed guest kernel and initramfs, if both are there.
pub fn guest_kernel_and_initrd() -> Option<(PathBuf, PathBuf)> {
    let g = guest_dir();
    let (kernel, initrd) = (g.join("vmlinux"), g.join("initrd.img"));
    (kernel.is_file() && initrd.is_file()).then_some((kernel, initrd))
}

/// QEMU and the installed guest (see [`guest_dir`]), with a skip reason naming what is missing.
pub fn require_guest() -> bool {
    require(
        which("qemu-system-x86_64").is_some(),
        "needs qemu-system-x86_64 on PATH",
    ) && require(
        guest_kernel_and_initrd().is_some(),
        &format!("no guest in {} (run scripts/guest)", guest_dir().display()),
    )
}

/// The CPU offers hardware virtualization (`vmx` or `svm` in /proc/cpuinfo): read from the host
/// itself, not from the code under test.
pub fn cpu_has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|f| f == "vmx" || f == "svm")
}

/// The host's KVM is PVM (`kvm_pvm` loaded), which runs only tiny guests.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
