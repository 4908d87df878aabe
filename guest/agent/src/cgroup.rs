//! A container's cgroup (v2) in the guest: signals to all its processes, pids, freeze, resource
//! updates, stats and the OOM counter. libcontainer creates and removes the cgroup; everything
//! here is plain file access, done in the agent (no fork).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use crate::error::{Error, Result};

/// Where the guest's cgroup2 hierarchy is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// `cgroups_path` is the spec's absolute `linux.cgroupsPath`.
    pub fn new(cgroups_path: &Path) -> Cgroup {
        let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
        Cgroup {
            path: Path::new(ROOT).join(rel),
        }
    }

    fn read(&self, file: &str) -> Result<String> {
        let p = self.path.join(file);
        std::fs::read_to_string(&p).map_err(Error::io(format!("read {}", p.display())))
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        std::fs::write(&p, value).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::FailedPrecondition(format!(
                    "{}: the guest kernel has no such cgroup file",
                    p.display()
                ))
            } else {
                Error::io(format!("write {value:?} to {}", p.display()))(e)
            }
        })
    }

    /// Every pid in the cgroup and its descendants.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        collect_pids(&self.path, &mut out)?;
        Ok(out)
    }

    /// Sends `signal` to every process; SIGKILL goes through `cgroup.kill` (atomic, races no
    /// fork).
    pub fn kill_all(&self, signal: i32) -> Result<()> {
        if signal == libc::SIGKILL && self.path.join("cgroup.kill").exists() {
            return self.write("cgroup.kill", "1");
        }
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| Error::InvalidArgument(format!("signal: {signal} is not a signal")))?;
        for pid in self.pids()? {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::errno(format!("kill {pid}"))(e)),
            }
        }
        Ok(())
    }

    /// Waits until no process is left (after a kill), up to `timeout`.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.pids() {
                Ok(p) if !p.is_empty() => {}
                _ => return true,
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Freezes or thaws, and waits until the kernel says it is done.
    pub async fn freeze(&self, frozen: bool) -> Result<()> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.read("cgroup.events")?.lines().any(|l| l == want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(Error::Internal(format!(
            "{}: not {} after 5s",
            self.path.display(),
            if frozen { "frozen" } else { "thawed" }
        )))
    }

    /// `linux.resources` (JSON) → cgroup files.
    pub fn update(&self, resources: &[u8], cpu_bandwidth: bool) -> Result<()> {
        let de = &mut serde_json::Deserializer::from_slice(resources);
        let res: LinuxResources = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "resources".to_owned()
            } else {
                format!("resources.{path}")
            };
            Error::InvalidArgument(format!("{field}: {}", e.inner()))
        })?;
        for (file, value) in resource_writes(&res, cpu_bandwidth)? {
            self.write(file, &value)?;
        }
        Ok(())
    }

    /// The OOM kills counted in `memory.events`.
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.events")
            .map(|t| keyed(&t, "oom_kill"))
            .unwrap_or(0)
    }

    pub fn stats(&self) -> Result<Stats> {
        let cpu = self.read("cpu.stat").unwrap_or_default();
        Ok(Stats {
            memory_usage: single(&self.read("memory.current").unwrap_or_default()).unwrap_or(0),
            // containerd reports an unlimited memory.max as the largest u64 ...
            memory_limit: single(&self.read("memory.max").unwrap_or_default()).unwrap_or(u64::MAX),
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            pids_current: single(&self.read("pids.current").unwrap_or_default()).unwrap_or(0),
            // ... and an unlimited pids.max as 0.
            pids_limit: single(&self.read("pids.max").unwrap_or_default()).unwrap_or(0),
            oom_kills: self.oom_kills(),
        })
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub oom_kills: u64,
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let text = match std::fs::read_to_string(&procs) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("read {}", procs.display()))(e)),
    };
    out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

/// A one-number file (`max` is None).
fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.events).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The cgroup v2 files and values for `linux.resources`, with runc's conversions (shares →
/// weight, swap limit = memory+swap − memory). Devices, block I/O, hugepages and network are
/// not applied in the guest.
pub fn resource_writes(
    res: &LinuxResources,
    cpu_bandwidth: bool,
) -> Result<Vec<(&'static str, String)>> {
    let mut w = Vec::new();
    let limit_or_max = |v: i64| {
        if v < 0 {
            "max".to_owned()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = res.memory() {
        if let Some(r) = m.reservation() {
            w.push(("memory.low", limit_or_max(r)));
        }
        if let Some(l) = m.limit() {
            w.push(("memory.max", limit_or_max(l)));
        }
        match (m.swap(), m.limit()) {
            (Some(s), _) if s < 0 => w.push(("memory.swap.max", "max".to_owned())),
            (Some(s), Some(l)) if l >= 0 => {
                if s < l {
                    return Err(Error::InvalidArgument(format!(
                        "resources.memory.swap: {s} is below memory.limit {l} (it counts memory + swap)"
                    )));
                }
                w.push(("memory.swap.max", (s - l).to_string()));
            }
            (Some(_), _) => {
                return Err(Error::InvalidArgument(
                    "resources.memory.swap: needs resources.memory.limit".into(),
                ));
            }
            (None, _) => {}
        }
    }
    if let Some(c) = res.cpu() {
        if let Some(shares) = c.shares()
            && shares > 0
        {
            let shares = shares.clamp(2, 262_144);
            w.push((
                "cpu.weight",
                (1 + ((shares - 2) * 9999) / 262_142).to_string(),
            ));
        }
        let quota = c.quota().filter(|q| *q > 0);
        if quota.is_some() || c.period().is_some() {
            if !cpu_bandwidth {
                if quota.is_some() {
                    return Err(Error::FailedPrecondition(
                        "resources.cpu.quota: the guest kernel has no CPU bandwidth control (CONFIG_CFS_BANDWIDTH)".into(),
                    ));
                }
            } else {
                let period = c.period().filter(|p| *p > 0).unwrap_or(100_000);
                let quota = quota.map_or("max".to_owned(), |q| q.to_string());
                w.push(("cpu.max", format!("{quota} {period}")));
            }
        }
        if let Some(cpus) = c.cpus().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = c.mems().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems", mems.clone()));
        }
    }
    if let Some(p) = res.pids() {
        w.push((
            "pids.max",
            if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".to_owned()
            },
        ));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn resources_become_cgroup_v2_writes() {
        let r = res(
            r#"{"memory":{"limit":268435456,"swap":536870912},"cpu":{"shares":1024,"quota":50000,"period":100000},"pids":{"limit":64}}"#,
        );
        assert_eq!(
            resource_writes(&r, true).unwrap(),
            vec![
                ("memory.max", "268435456".to_owned()),
                ("memory.swap.max", "268435456".to_owned()),
                ("cpu.weight", "39".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("pids.max", "64".to_owned()),
            ]
        );
    }

    #[test]
    fn unlimited_values_are_max() {
        let r = res(r#"{"memory":{"limit":-1},"pids":{"limit":0}}"#);
        assert_eq!(
            resource_writes(&r, true).unwrap(),
            vec![
                ("memory.max", "max".to_owned()),
                ("pids.max", "max".to_owned())
            ]
        );
    }

    #[test]
    fn a_cpu_quota_without_bandwidth_control_is_refused() {
        let r = res(r#"{"cpu":{"quota":50000}}"#);
        assert!(matches!(
            resource_writes(&r, false),
            Err(Error::FailedPrecondition(m)) if m.starts_with("resources.cpu.quota")
        ));
    }

    #[test]
    fn swap_below_memory_names_the_field() {
        let r = res(r#"{"memory":{"limit":200,"swap":100}}"#);
        assert!(matches!(
            resource_writes(&r, true),
            Err(Error::InvalidArgument(m)) if m.starts_with("resources.memory.swap")
        ));
    }

    #[test]
    fn update_names_a_bad_field() {
        let cg = Cgroup::new(Path::new("/nonexistent/yard-test"));
        let err = cg.update(br#"{"memory":{"limit":"lots"}}"#, true);
        assert!(
            matches!(&err, Err(Error::InvalidArgument(m)) if m.starts_with("resources.memory.limit: ")),
            "{err:?}"
        );
    }

    #[test]
    fn keyed_files_parse() {
        let text = "usage_usec 1200\nuser_usec 1000\nsystem_usec 200\n";
        assert_eq!(keyed(text, "user_usec"), 1000);
        assert_eq!(keyed(text, "nr_periods"), 0);
        assert_eq!(single("max\n"), None);
        assert_eq!(single("42\n"), Some(42));
    }
}
