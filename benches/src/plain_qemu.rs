//! A plain QEMU boot of the guest kernel, the peer of the vm runtime's numbers: a trivial
//! busybox init that prints [`MARKER`] on the serial console and reboots.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim_yard_vm_v1::qemu::cmdline::{BASE_KERNEL_ARGS, MACHINE, TCG_KERNEL_ARGS};
use switchyard_tests::{cpu_has_hardware_virtualization, kvm_is_pvm};

/// What the trivial init prints on the console once it runs.
pub const MARKER: &str = "plain-init-ready";

/// KVM can run a full guest here: hardware virtualization, a KVM device, and not PVM.
pub fn hardware_virtualization() -> bool {
    cpu_has_hardware_virtualization() && Path::new("/dev/kvm").exists() && !kvm_is_pvm()
}

/// A busybox initramfs whose init prints the marker on the console and reboots at once (`dir`
/// holds it and its tree).
pub fn trivial_initrd(dir: &Path) -> PathBuf {
    let root = dir.join("initrd-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for d in ["dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let init = root.join("init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\n/bin/busybox echo {MARKER} > /dev/console\n/bin/busybox reboot -f\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join("trivial.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio --quiet -o -H newc -R 0:0 > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio");
    out
}

/// One plain QEMU run: (spawn → marker on the console, spawn → exit).
pub fn plain_boot(kernel: &Path, initrd: &Path, accel: &str, append: &str) -> (Duration, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", MACHINE, "-accel", accel, "-cpu"])
        .arg(if accel == "kvm" { "host" } else { "max" })
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let stdout = child.stdout.take().unwrap();
    let mut ready = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if ready.is_none() && line.contains(MARKER) {
            ready = Some(t0.elapsed());
        }
    }
    let _ = child.wait();
    let total = t0.elapsed();
    (
        ready.expect("the trivial init never printed its marker"),
        total,
    )
}

/// The kernel command line the vm shim gives its guest under `accel`, without the per-VM
/// arguments (see shims/vm/src/qemu/cmdline.rs): the same timer settings for the plain boot.
/// `tsc_khz` is the shim's measured host TSC rate (TCG only), if it measured one.
pub fn shim_kernel_args(accel: &str, tsc_khz: Option<u64>) -> String {
    let mut append = BASE_KERNEL_ARGS.join(" ");
    if accel == "tcg" {
        append.push(' ');
        append.push_str(&TCG_KERNEL_ARGS.join(" "));
        if let Some(k) = tsc_khz {
            append.push_str(&format!(" tsc_early_khz={k}"));
        }
    }
    append
}

/// A stock kernel command line for the plain boot: serial console, quiet, reboot on panic.
pub const STOCK_KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 reboot=t";
