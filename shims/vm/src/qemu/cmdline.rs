//! The QEMU command line for one VM: a pure function of the [`VmConfig`] and the child's fd
//! numbers, unit-tested without QEMU.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use yard_agent_protocol::{PORT_NAME, SHARE_TAG, VOLUME_TAG};

use crate::hypervisor::{Accel, VmConfig};

/// The kernel arguments every VM gets; TCG's ([`TCG_KERNEL_ARGS`], [`Tuning`]) and then
/// [`VmConfig::kernel_args`] follow.
///
/// - `console=ttyS0 quiet`: the 8250 console, without the boot chatter (every byte is an
///   emulated UART write, slow under TCG). `8250.nr_uarts=1`: probe only that port.
/// - `panic=-1 reboot=t`: a panic reboots at once through the triple-fault path, and with QEMU's
///   `-no-reboot` any reboot ends QEMU (microvm has no ACPI, so there is no power-off).
/// - `pty.legacy_count=0`: no BSD ptys (the kernel registers 256 pairs otherwise, each a device
///   node; about 0.1 s under TCG). Containers use /dev/pts.
pub const BASE_KERNEL_ARGS: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "8250.nr_uarts=1",
    "panic=-1",
    "reboot=t",
    "pty.legacy_count=0",
];

/// Extra kernel arguments under TCG, where the guest's timer calibrations wait in real time:
///
/// - `nolapic_timer`: no local APIC timer, so no calibration of it (two rounds of 100 ms of
///   guest ticks, about 0.25 s here); the PIT drives the tick and broadcasts it to other CPUs.
///   TCG has no TSC-deadline timer, which would also skip the calibration.
/// - `no_timer_check`: skip the 40 ms check that IRQ0 reaches the IO-APIC.
///
/// Plus `tsc_early_khz` from [`Tuning`].
pub const TCG_KERNEL_ARGS: &[&str] = &["nolapic_timer", "no_timer_check"];

/// Host facts that shape the command line, measured once by the backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// The host TSC rate. Under TCG the guest's TSC *is* the host's (QEMU's `rdtsc` reads the
    /// host counter), but the guest cannot calibrate it without a PIT/HPET reference and falls
    /// back to jiffies (4 ms resolution) after a 40 ms delay-loop calibration; with
    /// `tsc_early_khz` it has the TSC clocksource and skips the calibration.
    pub tsc_khz: Option<u64>,
}

/// `-M microvm` options. `acpi=off` is required: with ACPI on (the default), QEMU describes the
/// virtio-mmio devices in a DSDT that our ACPI-less kernel never reads, and stops appending the
/// `virtio_mmio.device=` arguments, so the guest sees no devices.
pub const MACHINE: &str = "microvm,acpi=off";

/// QEMU's own seccomp filter (`-sandbox`), defence in depth should a guest break into the
/// device model: besides the always-denied set, obsolete system calls, privilege changes
/// (`setuid` and friends), spawning processes (`fork`, `execve`; threads stay allowed) and
/// scheduler/affinity changes are refused. QEMU 7.2 here takes all four; none of our devices
/// (microvm, virtio-serial, virtio-blk, virtio-9p with `security_model=none`) needs them.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The fds the child finds its channels on.
#[derive(Clone, Copy, Debug)]
pub struct ChildFds {
    /// Connected stream socket to the agent's virtio-serial port.
    pub agent: RawFd,
    /// Connected stream socket for QMP.
    pub qmp: RawFd,
    /// Connected stream socket the serial console writes to.
    pub console: RawFd,
    /// The pod network's tap ([`VmConfig::net`]), when the VM has one.
    pub tap: Option<RawFd>,
}

/// QEMU's option syntax: a `,` inside a value is written `,,`.
fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn opt(prefix: &str, value: &OsStr, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape(value));
    s.push(suffix);
    s
}

/// The kernel command line: the base arguments, TCG's, then the caller's.
pub fn kernel_cmdline(cfg: &VmConfig, tuning: Tuning) -> String {
    let mut args: Vec<String> = BASE_KERNEL_ARGS.iter().map(|s| s.to_string()).collect();
    if cfg.accel == Accel::Tcg {
        args.extend(TCG_KERNEL_ARGS.iter().map(|s| s.to_string()));
        if let Some(khz) = tuning.tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
        }
    }
    args.extend(cfg.kernel_args.iter().cloned());
    args.join(" ")
}

/// Arguments after the binary name.
pub fn args(cfg: &VmConfig, fds: ChildFds, tuning: Tuning) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));

    push(&["-name", &cfg.id.replace(',', ",,")]);
    push(&["-M", MACHINE]);
    match cfg.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    let smp = cfg.vcpus.max(1).to_string();
    let mem = format!("{}M", cfg.memory_mib);
    push(&["-smp", &smp, "-m", &mem]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-sandbox",
        SANDBOX,
    ]);

    let console = format!("socket,id=con,fd={}", fds.console);
    push(&["-chardev", &console, "-serial", "chardev:con"]);

    let qmp = format!("socket,id=qmp,fd={}", fds.qmp);
    push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);

    let agent = format!("socket,id=agent,fd={}", fds.agent);
    let port = format!("virtserialport,chardev=agent,name={PORT_NAME}");
    push(&[
        "-chardev",
        &agent,
        "-device",
        "virtio-serial-device",
        "-device",
        &port,
    ]);

    if let Some(disk) = &cfg.root_disk {
        a.push("-drive".into());
        a.push(opt(
            "id=root,file=",
            disk.as_os_str(),
            ",format=raw,if=none,readonly=on",
        ));
        a.extend(["-device", "virtio-blk-device,drive=root"].map(OsString::from));
    }
    if let Some(dir) = &cfg.share_dir {
        a.push("-fsdev".into());
        a.push(opt(
            "local,id=share,path=",
            dir.as_os_str(),
            ",security_model=none,readonly=on",
        ));
        a.push("-device".into());
        a.push(format!("virtio-9p-device,fsdev=share,mount_tag={SHARE_TAG}").into());
    }
    if let Some(dir) = &cfg.volume_dir {
        // Read-write; its entries are mount points of host volumes, so inode numbers of
        // several devices meet: `multidevs=remap` keeps them apart in the guest.
        a.push("-fsdev".into());
        a.push(opt(
            "local,id=vol,path=",
            dir.as_os_str(),
            ",security_model=none,multidevs=remap",
        ));
        a.push("-device".into());
        a.push(format!("virtio-9p-device,fsdev=vol,mount_tag={VOLUME_TAG}").into());
    }

    if let (Some(net), Some(fd)) = (&cfg.net, fds.tap) {
        // The tap is opened by the shim in the pod's namespace (QEMU runs in the host's and
        // runs no scripts); vnet headers are probed from the fd and offloads follow the guest.
        let mac = crate::engine::net::format_mac(&net.mac);
        a.extend(
            [
                "-netdev".to_owned(),
                format!("tap,id=net0,fd={fd}"),
                "-device".to_owned(),
                format!(
                    "virtio-net-device,netdev=net0,mac={mac},host_mtu={}",
                    net.mtu
                ),
            ]
            .map(OsString::from),
        );
    }

    a.push("-kernel".into());
    a.push(cfg.kernel.clone().into_os_string());
    a.push("-initrd".into());
    a.push(cfg.initrd.clone().into_os_string());
    a.push("-append".into());
    a.push(kernel_cmdline(cfg, tuning).into());
    a
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn cfg(accel: Accel) -> VmConfig {
        VmConfig {
            id: "sb-1".into(),
            state_dir: "/run/vm/sb-1".into(),
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd".into(),
            kernel_args: vec!["yard.debug=1".into()],
            vcpus: 2,
            memory_mib: 256,
            accel,
            boot_timeout: Duration::from_secs(5),
            root_disk: None,
            share_dir: None,
            volume_dir: None,
            net: None,
        }
    }

    const FDS: ChildFds = ChildFds {
        agent: 3,
        qmp: 4,
        console: 5,
        tap: None,
    };

    const TUNING: Tuning = Tuning {
        tsc_khz: Some(2_445_406),
    };

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag`, for each occurrence.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn tcg_and_kvm_differ_only_in_accelerator_and_cpu() {
        let tcg = strings(&args(&cfg(Accel::Tcg), FDS, TUNING));
        let kvm = strings(&args(&cfg(Accel::Kvm), FDS, TUNING));
        assert_eq!(values(&tcg, "-accel"), ["tcg"]);
        assert_eq!(values(&tcg, "-cpu"), ["max"]);
        assert_eq!(values(&kvm, "-accel"), ["kvm"]);
        assert_eq!(values(&kvm, "-cpu"), ["host"]);
        for a in [&tcg, &kvm] {
            assert_eq!(values(a, "-M"), [MACHINE]);
            assert_eq!(values(a, "-smp"), ["2"]);
            assert_eq!(values(a, "-m"), ["256M"]);
            assert!(a.contains(&"-no-reboot".to_owned()));
            assert!(a.contains(&"-nodefaults".to_owned()));
            assert_eq!(values(a, "-kernel"), ["/k/vmlinux"]);
            assert_eq!(values(a, "-initrd"), ["/k/initrd"]);
            assert_eq!(
                values(a, "-sandbox"),
                ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
            );
            assert!(!a.contains(&"-drive".to_owned()));
            // No share asked for: no 9p device at all.
            assert!(!a.contains(&"-fsdev".to_owned()));
            assert!(!a.iter().any(|x| x.contains("9p")), "{a:?}");
        }
        assert_eq!(
            values(&tcg, "-append"),
            [
                "console=ttyS0 quiet 8250.nr_uarts=1 panic=-1 reboot=t pty.legacy_count=0 \
              nolapic_timer no_timer_check tsc_early_khz=2445406 yard.debug=1"
            ]
        );
        // KVM guests calibrate against kvmclock: no TCG workarounds.
        assert_eq!(
            values(&kvm, "-append"),
            [
                "console=ttyS0 quiet 8250.nr_uarts=1 panic=-1 reboot=t pty.legacy_count=0 \
              yard.debug=1"
            ]
        );
    }

    #[test]
    fn channels_are_sockets_on_the_given_fds() {
        let a = strings(&args(&cfg(Accel::Tcg), FDS, TUNING));
        assert_eq!(
            values(&a, "-chardev"),
            [
                "socket,id=con,fd=5",
                "socket,id=qmp,fd=4",
                "socket,id=agent,fd=3"
            ]
        );
        assert_eq!(values(&a, "-serial"), ["chardev:con"]);
        assert_eq!(values(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(
            values(&a, "-device"),
            [
                "virtio-serial-device",
                "virtserialport,chardev=agent,name=yard.agent"
            ]
        );
    }

    #[test]
    fn a_pod_network_is_a_virtio_net_device_on_the_tap_fd() {
        let mut c = cfg(Accel::Tcg);
        assert!(values(&strings(&args(&c, FDS, TUNING)), "-netdev").is_empty());
        let tap = std::fs::File::open("/dev/null").unwrap();
        c.net = Some(crate::hypervisor::NetDevice {
            tap: std::sync::Arc::new(tap.into()),
            mac: [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x07],
            mtu: 1450,
        });
        // No fd for it: no device (the backend maps one whenever it has a tap).
        assert!(values(&strings(&args(&c, FDS, TUNING)), "-netdev").is_empty());
        let fds = ChildFds {
            tap: Some(6),
            ..FDS
        };
        let a = strings(&args(&c, fds, TUNING));
        assert_eq!(values(&a, "-netdev"), ["tap,id=net0,fd=6"]);
        assert_eq!(
            values(&a, "-device").last().map(String::as_str),
            Some("virtio-net-device,netdev=net0,mac=0a:58:0a:58:00:07,host_mtu=1450")
        );
    }

    #[test]
    fn root_disk_and_share_are_read_only_and_commas_are_escaped() {
        let mut c = cfg(Accel::Tcg);
        c.root_disk = Some(PathBuf::from("/cache/ab,c.erofs"));
        c.share_dir = Some(PathBuf::from("/run/share"));
        c.volume_dir = Some(PathBuf::from("/run/vol"));
        c.id = "a,b".into();
        let a = strings(&args(&c, FDS, TUNING));
        assert_eq!(
            values(&a, "-drive"),
            ["id=root,file=/cache/ab,,c.erofs,format=raw,if=none,readonly=on"]
        );
        assert_eq!(
            values(&a, "-fsdev"),
            [
                "local,id=share,path=/run/share,security_model=none,readonly=on",
                "local,id=vol,path=/run/vol,security_model=none,multidevs=remap"
            ]
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=root".to_owned()));
        assert!(devices.contains(&"virtio-9p-device,fsdev=share,mount_tag=yardshare".to_owned()));
        assert!(devices.contains(&"virtio-9p-device,fsdev=vol,mount_tag=yardvol".to_owned()));
        assert_eq!(values(&a, "-name"), ["a,,b"]);
    }
}
