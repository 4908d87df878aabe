//! PID 1 duties: the guest's pseudo filesystems, the console, logging, cgroups, loopback; guest
//! facts for Hello; power-off.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use yard_agent_protocol::{
    CMDLINE_BOOT_TIMER, CMDLINE_CHANNEL, CMDLINE_DEBUG, CMDLINE_ZYGOTE, cmdline_value,
};

use crate::cgroup;

/// What boot found out.
#[derive(Debug, Default)]
pub struct Boot {
    pub debug: bool,
    /// `yard.channel=vsock`: serve on vsock only (the VMM has no virtio-serial port).
    pub vsock_only: bool,
    /// `yard.boot_timer=1`: tell the VMM's boot-timer device when the agent is ready.
    pub boot_timer: bool,
    /// Not `yard.zygote=0`: start the runtime zygote (`zygote.rs`).
    pub zygote: bool,
    pub cpu_bandwidth: bool,
    /// Problems met before logging was up.
    pub early_errors: Vec<String>,
}

struct MountPoint {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NOEXEC_NODEV: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NODEV);

/// The guest's filesystems, in order (/dev first: the console is there).
const MOUNTS: &[MountPoint] = &[
    MountPoint {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountPoint {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NOEXEC_NODEV,
        data: None,
    },
    MountPoint {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NOEXEC_NODEV,
        data: None,
    },
    MountPoint {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    MountPoint {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NOEXEC_NODEV,
        data: Some("mode=1777"),
    },
    MountPoint {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountPoint {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountPoint {
        source: "cgroup2",
        target: cgroup::ROOT,
        fstype: "cgroup2",
        flags: NOSUID_NOEXEC_NODEV,
        data: None,
    },
];

/// Set in the environment once the agent runs from its own root (see [`leave_initramfs`]).
const SWITCHED: &str = "YARD_AGENT_ROOT";

/// The initramfs is the kernel's `rootfs` mount, which `pivot_root(2)` cannot leave (EINVAL):
/// a container could only be entered with MS_MOVE + chroot, which a process with
/// CAP_SYS_CHROOT escapes. So, like `switch_root`, the agent first copies itself into a tmpfs,
/// moves that over `/`, chroots into it and re-executes itself from there; its initramfs copy
/// is unlinked, so that memory is freed. Returns only if that failed (or was done already).
pub fn leave_initramfs() -> Option<String> {
    if std::env::var_os(SWITCHED).is_some() {
        return None;
    }
    let new = Path::new("/.yard-root");
    let step = |what: &str, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    let result = (|| -> Result<(), String> {
        step("create /.yard-root", std::fs::create_dir_all(new))?;
        step(
            "mount a tmpfs on /.yard-root",
            nix::mount::mount(
                Some("tmpfs"),
                new,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )
            .map_err(std::io::Error::from),
        )?;
        for d in ["dev", "proc", "sys", "run", "tmp"] {
            step(
                "create the new root's directories",
                std::fs::create_dir_all(new.join(d)),
            )?;
        }
        step(
            "copy /init",
            std::fs::copy("/init", new.join("init")).map(|_| ()),
        )?;
        let _ = std::fs::remove_file("/init");
        step("chdir", std::env::set_current_dir(new))?;
        step(
            "move the new root onto /",
            nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(std::io::Error::from),
        )?;
        step(
            "chroot",
            nix::unistd::chroot(".").map_err(std::io::Error::from),
        )?;
        step("chdir /", std::env::set_current_dir("/"))?;
        Ok(())
    })();
    if let Err(e) = result {
        return Some(format!("leave the initramfs: {e}"));
    }
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new("/init")
        .args(std::env::args_os().skip(1))
        .env(SWITCHED, "1")
        .exec();
    // The old image is still mapped: carry on from it, chrooted in the new root.
    Some(format!("re-execute /init from the new root: {e}"))
}

/// Sets up the guest; never fails (what fails is reported and the agent carries on: the host
/// learns more from a running agent than from a dead guest).
pub fn init(early_errors: Vec<String>) -> Boot {
    let mut boot = Boot {
        early_errors,
        ..Boot::default()
    };
    for m in MOUNTS {
        let _ = std::fs::create_dir_all(m.target);
        match nix::mount::mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            // devtmpfs may be mounted by the kernel already.
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => boot
                .early_errors
                .push(format!("mount {} on {}: {e}", m.fstype, m.target)),
        }
        if m.target == "/dev" {
            console_stdio();
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    boot.debug = debug_requested(&cmdline);
    boot.vsock_only = cmdline_value(&cmdline, CMDLINE_CHANNEL) == Some("vsock");
    boot.boot_timer = cmdline_value(&cmdline, CMDLINE_BOOT_TIMER).is_some_and(truthy);
    boot.zygote = cmdline_value(&cmdline, CMDLINE_ZYGOTE).is_none_or(truthy);
    // Children of the root get the controllers the agent reports and limits.
    let controllers = std::fs::read_to_string(Path::new(cgroup::ROOT).join("cgroup.controllers"))
        .unwrap_or_default();
    let enable: Vec<String> = ["cpu", "cpuset", "memory", "pids"]
        .into_iter()
        .filter(|c| controllers.split_whitespace().any(|have| have == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if let Err(e) = std::fs::write(
        Path::new(cgroup::ROOT).join("cgroup.subtree_control"),
        enable.join(" "),
    ) {
        boot.early_errors
            .push(format!("enable cgroup controllers {enable:?}: {e}"));
    }
    // cpu.max exists only with CONFIG_CFS_BANDWIDTH: look in a child cgroup.
    let probe = Path::new(cgroup::ROOT).join("yard");
    let _ = std::fs::create_dir_all(&probe);
    boot.cpu_bandwidth = probe.join("cpu.max").exists();
    if let Err(e) = std::fs::write(probe.join("cgroup.subtree_control"), enable.join(" ")) {
        boot.early_errors
            .push(format!("enable cgroup controllers under /yard: {e}"));
    }
    if let Err(e) = crate::network::loopback_up() {
        boot.early_errors.push(format!("bring up lo: {e}"));
    }
    let _ = nix::unistd::sethostname("switchyard");
    boot
}

/// The kernel starts init with the console as stdio only if the initramfs has /dev/console;
/// ours has no device nodes, so stdio is (re)opened here once devtmpfs is mounted. Panics and
/// anything else written to stderr reach the console.
fn console_stdio() {
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    else {
        return;
    };
    let _ = rustix::stdio::dup2_stdin(&console);
    let _ = rustix::stdio::dup2_stdout(&console);
    let _ = rustix::stdio::dup2_stderr(&console);
}

fn debug_requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| {
        w.strip_prefix(CMDLINE_DEBUG)
            .and_then(|r| r.strip_prefix('='))
            .is_some_and(truthy)
    })
}

fn truthy(v: &str) -> bool {
    matches!(v, "1" | "y" | "yes" | "true" | "on")
}

/// Log lines carry the guest's uptime, like the kernel's.
struct Uptime;

impl FormatTime for Uptime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let t = uptime();
        write!(w, "[{:5}.{:06}]", t.as_secs(), t.subsec_micros())
    }
}

pub fn uptime() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Logs to the console: the agent's info and up (debug with `yard.debug=1`), other crates'
/// warnings.
pub fn logging(debug: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let Ok(console) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    else {
        return;
    };
    let (ours, theirs) = if debug {
        (tracing::Level::DEBUG, tracing::Level::DEBUG)
    } else {
        (tracing::Level::INFO, tracing::Level::WARN)
    };
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("yard_agent", ours)
        .with_default(theirs);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::sync::Mutex::new(console))
        .with_ansi(false)
        .with_timer(Uptime)
        .with_target(debug);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(filter)
        .try_init();
}

/// A panic is logged before the process (or only the task) dies.
pub fn panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
        // In case logging is not up: stderr is the console.
        let _ = writeln!(std::io::stderr(), "yard-agent: panic: {info}");
    }));
}

/// Facts for Hello.
pub struct Facts {
    pub kernel_release: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub uptime: Duration,
}

pub fn facts() -> Facts {
    let uname = rustix::system::uname();
    let kernel_release = uname.release().to_string_lossy().into_owned();
    let vcpus = rustix::thread::sched_getaffinity(None)
        .map(|set| set.count())
        .unwrap_or(0);
    let vcpus = if vcpus > 0 {
        vcpus
    } else {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| t.lines().filter(|l| l.starts_with("processor")).count() as u32)
            .unwrap_or(1)
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Facts {
        kernel_release,
        vcpus,
        memory_bytes: mem_total(&meminfo),
        uptime: uptime(),
    }
}

fn mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Syncs and reboots: with `reboot=t -no-reboot`, QEMU exits (microvm has no ACPI power-off).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    tracing::error!(error = ?e, "reboot");
    // PID 1 exiting panics the kernel, which (panic=-1) reboots too.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_debug_switch_is_read_from_the_command_line() {
        assert!(debug_requested("console=ttyS0 yard.debug=1 quiet"));
        assert!(!debug_requested("console=ttyS0 yard.debug=0"));
        assert!(!debug_requested("console=ttyS0 yard.debugx=1"));
        assert!(!debug_requested(""));
    }

    #[test]
    fn mem_total_is_in_bytes() {
        assert_eq!(
            mem_total("MemTotal:        2014340 kB\nMemFree: 1 kB\n"),
            2014340 * 1024
        );
        assert_eq!(mem_total(""), 0);
    }
}
