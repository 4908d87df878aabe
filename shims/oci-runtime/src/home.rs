//! `HOME` for a process whose environment has none (or an empty one), found as runc finds it:
//! the home of the process's uid in the container's `/etc/passwd`, else `/`.
//!
//! libcontainer 0.7 fills a missing `HOME` in the container's init with glibc's `getpwuid_r`,
//! after `pivot_root`. glibc then reads the image's `/etc/nsswitch.conf` and loads the NSS
//! modules it names from the image, into the init, before the init executes the container's
//! process and while it still holds its channels to this runtime. An image author's code has
//! no business there; runc parses `/etc/passwd` itself for the same reason. So this runtime sets
//! `HOME` before libcontainer reads the process, and libcontainer never looks it up.
//!
//! The file is read from the host side, inside the container's root (`inroot.rs`: symlinks and
//! `..` stop at the root; only a regular file is opened), and only its first [`MAX_PASSWD`]
//! bytes. At create, before the container's mounts exist, the file is the one they will show:
//! that of the last bind mount of the spec over `/etc/passwd` or a directory above it (a
//! Kubernetes volume, a `--mount`), read in the mount's source as in a root; under any other
//! mount over it there is no file known yet, and `HOME` is `/`.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Process};

const PASSWD: &str = "/etc/passwd";

/// The most of `/etc/passwd` that is read; entries past it are not looked at.
pub const MAX_PASSWD: u64 = 4 << 20;

/// Sets `HOME` in `process`'s environment when it has none or an empty one, from the
/// `/etc/passwd` under `root` with `mounts` over it (none when `root` shows them already; a
/// relative source is `bundle`'s); returns whether it changed anything.
pub(crate) fn set_home(
    process: &mut Process,
    root: &Path,
    mounts: &[Mount],
    bundle: &Path,
) -> bool {
    let env = process.env().clone().unwrap_or_default();
    let set = env
        .iter()
        .filter_map(|e| e.strip_prefix("HOME="))
        .next_back()
        .is_some_and(|v| !v.is_empty());
    if set {
        return false;
    }
    let home = home(root, mounts, bundle, process.user().uid());
    let mut env: Vec<String> = env
        .into_iter()
        .filter(|e| !e.starts_with("HOME="))
        .collect();
    env.push(format!("HOME={home}"));
    process.set_env(Some(env));
    true
}

/// The home directory of `uid` in the `/etc/passwd` of `root` with `mounts` over it, or `/`
/// when the file or the entry is missing, unreadable or empty (runc's default).
pub(crate) fn home(root: &Path, mounts: &[Mount], bundle: &Path, uid: u32) -> String {
    let (dir, path) = match passwd_source(mounts, bundle) {
        Source::Root => (root.to_owned(), PathBuf::from(PASSWD)),
        Source::Bind { dir, path } => (dir, path),
        Source::Unknown => return "/".to_owned(),
    };
    read_passwd(&dir, &path)
        .and_then(|passwd| lookup(&passwd, uid))
        .unwrap_or_else(|| "/".to_owned())
}

/// Where a create finds the container's `/etc/passwd`.
enum Source {
    /// In the root: no mount of the spec covers it.
    Root,
    /// At `path` in `dir`, a bind mount's source (for a mount of the file itself, the source's
    /// directory and its name).
    Bind { dir: PathBuf, path: PathBuf },
    /// Under another kind of mount (a tmpfs over `/etc`): no file exists before the container.
    Unknown,
}

/// The last of `mounts` over `/etc/passwd` or a directory above it decides where it is.
fn passwd_source(mounts: &[Mount], bundle: &Path) -> Source {
    let Some((m, rest)) = mounts.iter().rev().find_map(|m| {
        let rest = Path::new(PASSWD).strip_prefix(m.destination()).ok()?;
        Some((m, rest))
    }) else {
        return Source::Root;
    };
    let Some(source) = crate::spec::bind_source(m, bundle) else {
        return Source::Unknown;
    };
    if !rest.as_os_str().is_empty() {
        return Source::Bind {
            dir: source,
            path: rest.to_owned(),
        };
    }
    match (source.parent(), source.file_name()) {
        (Some(dir), Some(name)) => Source::Bind {
            dir: dir.to_owned(),
            path: PathBuf::from(name),
        },
        _ => Source::Unknown,
    }
}

/// The home field of the first entry for `uid` (`name:password:uid:gid:gecos:home:shell`).
fn lookup(passwd: &[u8], uid: u32) -> Option<String> {
    String::from_utf8_lossy(passwd).lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let home = fields.get(5).filter(|h| !h.is_empty())?;
        (fields.get(2)?.trim().parse::<u32>().ok()? == uid).then(|| (*home).to_owned())
    })
}

fn read_passwd(root: &Path, path: &Path) -> Option<Vec<u8>> {
    let root = crate::inroot::open_root(root).ok()?;
    let found = crate::inroot::find(&root, path).ok()??;
    crate::inroot::read(&found, MAX_PASSWD).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{MountBuilder, ProcessBuilder, UserBuilder};

    fn root(passwd: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(dir.path().join("etc")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("etc/passwd"), passwd).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    fn process(uid: u32, env: &[&str]) -> Process {
        ProcessBuilder::default()
            .user(
                UserBuilder::default()
                    .uid(uid)
                    .gid(uid)
                    .build()
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .env(env.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnohome:x:7:7::::\nu:x:1000:1000:U:/home/u:/bin/sh\nagain:x:1000:1:::/elsewhere\n";

    fn mount(destination: &str, typ: &str, source: &Path, options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// At create the file is the one the container will see: that of the last bind mount over
    /// `/etc/passwd` or a directory above it, read in the mount's source; under another kind of
    /// mount (a tmpfs over `/etc`) there is none yet. Mounts elsewhere change nothing.
    #[test]
    fn a_bind_mount_over_the_file_or_its_directory_is_what_is_read() {
        let image = root("root:x:0:0::/from-image:/bin/sh\n");
        let volume = root("root:x:0:0::/from-etc-volume:/bin/sh\n");
        let file = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            file.path().join("users"),
            "root:x:0:0::/from-file-mount:/bin/sh\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let over_file = mount("/etc/passwd", "bind", &file.path().join("users"), &["ro"]);
        let over_etc = mount("/etc/", "none", &volume.path().join("etc"), &["rbind"]);
        let tmpfs = mount("/etc", "tmpfs", Path::new("tmpfs"), &[]);
        let elsewhere = mount("/etc/passwd.d", "bind", file.path(), &["bind"]);
        let home_with = |mounts: &[Mount]| home(image.path(), mounts, Path::new("/"), 0);
        assert_eq!(home_with(&[]), "/from-image");
        assert_eq!(home_with(std::slice::from_ref(&elsewhere)), "/from-image");
        assert_eq!(
            home_with(std::slice::from_ref(&over_file)),
            "/from-file-mount"
        );
        assert_eq!(
            home_with(std::slice::from_ref(&over_etc)),
            "/from-etc-volume"
        );
        assert_eq!(
            home_with(&[over_etc.clone(), over_file.clone(), elsewhere]),
            "/from-file-mount",
            "the last mount over it wins"
        );
        assert_eq!(
            home_with(&[over_file.clone(), over_etc]),
            "/from-etc-volume",
            "a later mount of /etc hides one of the file"
        );
        assert_eq!(home_with(&[over_file, tmpfs]), "/", "no file under a tmpfs");
        // A relative source is the bundle's, as runc takes it.
        let relative = mount("/etc/passwd", "bind", Path::new("users"), &[]);
        assert_eq!(
            home(image.path(), &[relative], file.path(), 0),
            "/from-file-mount"
        );
    }

    #[test]
    fn home_is_the_uids_entry_else_slash() {
        let r = root(PASSWD);
        assert_eq!(home(r.path(), &[], Path::new("/"), 0), "/root");
        assert_eq!(
            home(r.path(), &[], Path::new("/"), 1000),
            "/home/u",
            "the first entry for the uid"
        );
        assert_eq!(
            home(r.path(), &[], Path::new("/"), 7),
            "/",
            "an empty home field"
        );
        assert_eq!(home(r.path(), &[], Path::new("/"), 4321), "/", "no entry");
        let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            home(empty.path(), &[], Path::new("/"), 0),
            "/",
            "no /etc/passwd"
        );
    }

    #[test]
    fn set_home_fills_only_a_missing_or_empty_home() {
        let r = root(PASSWD);
        let mut p = process(1000, &["PATH=/bin", "HOME="]);
        assert!(set_home(&mut p, r.path(), &[], Path::new("/")));
        assert_eq!(
            p.env().as_deref(),
            Some(&["PATH=/bin".to_owned(), "HOME=/home/u".to_owned()][..])
        );
        assert!(
            !set_home(&mut p, r.path(), &[], Path::new("/")),
            "a second time changes nothing"
        );
        let mut p = process(0, &["HOME=/mine"]);
        assert!(!set_home(&mut p, r.path(), &[], Path::new("/")));
        assert_eq!(p.env().as_deref(), Some(&["HOME=/mine".to_owned()][..]));
        let mut p = process(0, &[]);
        assert!(set_home(&mut p, r.path(), &[], Path::new("/")));
        assert_eq!(p.env().as_deref(), Some(&["HOME=/root".to_owned()][..]));
    }

    /// The image's `/etc/passwd` is read inside its root: a symlink out of it (absolute or by
    /// `..`) resolves under the root, and a fifo is never opened (reading it would block).
    #[test]
    fn passwd_is_read_inside_the_root_and_only_as_a_regular_file() {
        let outside = root("root:x:0:0:root:/from-outside:/bin/sh\n");
        let outside_passwd = outside.path().join("etc/passwd");
        for target in [
            outside_passwd.display().to_string(),
            format!("../../../../../../..{}", outside_passwd.display()),
        ] {
            let r = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            std::fs::create_dir(r.path().join("etc")).unwrap_or_else(|e| panic!("{e}"));
            std::os::unix::fs::symlink(&target, r.path().join("etc/passwd"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                home(r.path(), &[], Path::new("/"), 0),
                "/",
                "followed {target} out of the root"
            );
        }
        let r = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir(r.path().join("etc")).unwrap_or_else(|e| panic!("{e}"));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.path().join("etc/passwd"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(home(r.path(), &[], Path::new("/"), 0), "/");
    }

    #[test]
    fn only_the_first_bytes_are_read() {
        let filler = "x:x:1:1:::\n".repeat((MAX_PASSWD as usize) / 11 + 1);
        let r = root(&format!("{filler}late:x:0:0::/late:/bin/sh\n"));
        assert_eq!(home(r.path(), &[], Path::new("/"), 0), "/");
    }
}
