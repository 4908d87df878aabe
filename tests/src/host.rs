//! What runs and what is left on the host, read from /proc, /sys/fs/cgroup and the file
//! system: processes, mounts, cgroups, sockets, directory entries.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Processes whose command line (NULs as spaces) contains every one of `needles`.
pub fn processes_matching(needles: &[&str]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(cmd) = cmdline(pid) else {
            continue;
        };
        if needles.iter().all(|n| cmd.contains(n)) {
            out.push((pid, cmd));
        }
    }
    out
}

/// A process's command line, NULs as spaces, if it exists.
pub fn cmdline(pid: u32) -> Option<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// A process's parent pid.
pub fn ppid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().map(|state| state != "Z"))
        .unwrap_or(false)
}

/// Whether a process is gone and collected (a zombie still counts as there).
pub fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

pub fn sigkill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Children of `parent` that are zombies (their `/proc/PID/stat` lines).
pub fn zombie_children(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (f.next(), f.next()) else {
            continue;
        };
        if state == "Z" && ppid.parse::<u32>().ok() == Some(parent) {
            out.push(stat.trim().to_owned());
        }
    }
    out
}

/// How many files a process has open.
pub fn open_fds(pid: u32) -> usize {
    entries(Path::new(&format!("/proc/{pid}/fd"))).len()
}

/// The inode of the unix socket listening at `path`, from /proc/net/unix.
pub fn listening_socket_inode(path: &Path) -> Option<u64> {
    // Num RefCount Protocol Flags Type St Inode Path; Flags has __SO_ACCEPTCON (0x10000).
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let listening = u32::from_str_radix(f.get(3)?, 16).ok()? & 0x10000 != 0;
        (listening && f.get(7).map(Path::new) == Some(path)).then(|| f.get(6)?.parse().ok())?
    })
}

/// What descriptor `fd` of `pid` is (`readlink /proc/PID/fd/FD`: a path, `socket:[INODE]`, ...).
pub fn fd_target(pid: u32, fd: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|t| t.display().to_string())
}

/// A process's soft and hard `RLIMIT_NOFILE` (`u64::MAX`: unlimited), from /proc/PID/limits.
pub fn nofile_limit(pid: u32) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let value = |v: &str| match v {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    };
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((value(fields.next()?)?, value(fields.next()?)?))
}

/// Mount points whose line in /proc/self/mountinfo contains `needle`.
pub fn mounts_matching(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The mount points (mountinfo's fifth field) at or under `dir`, deepest first, so they can be
/// unmounted in that order.
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// cgroup directories (v1 controllers or the v2 tree) for `relative` (like
/// `switchyard/default/ID`) that exist.
pub fn cgroups_matching(relative: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut found = Vec::new();
    let direct = root.join(relative);
    if direct.is_dir() {
        found.push(direct);
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let p = e.path().join(relative);
            if p.is_dir() {
                found.push(p);
            }
        }
    }
    found
}

/// Kills every process in the cgroup `relative` and its descendants, in every hierarchy, and
/// removes the cgroups (deepest first). For a test's clean-up: what a failed test left.
pub fn kill_cgroup_tree(relative: &str) {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
        out.push(dir.to_owned());
    }
    let mut dirs = Vec::new();
    for top in cgroups_matching(relative) {
        walk(&top, &mut dirs);
    }
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            sigkill(pid);
        }
    }
    for d in &dirs {
        // A cgroup can be removed once its killed processes are gone.
        crate::eventually(std::time::Duration::from_secs(10), || {
            std::fs::remove_dir(d).is_ok() || !d.exists()
        });
    }
}

/// cgroups under `switchyard/default/` (in every hierarchy) whose name starts with `prefix`.
pub fn cgroups_with_prefix(prefix: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join("switchyard/default")];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        dirs.push(e.path().join("switchyard/default"));
    }
    dirs.iter()
        .flat_map(|d| {
            entries(d)
                .into_iter()
                .filter(|n| n.starts_with(prefix))
                .map(move |n| d.join(n))
        })
        .collect()
}

/// Sockets anywhere under `dir`.
pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_socket() {
                found.push(e.path());
            }
        }
    }
    found
}

/// Files (anything but directories) anywhere under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Names of the entries of `dir` (none if it does not exist).
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
