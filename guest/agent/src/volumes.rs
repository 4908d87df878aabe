//! A container's bind mounts, given sources in the guest: the host cannot name its own paths
//! here, so it lists each bind mount of the spec as a [`Volume`]: an entry of the read-write
//! volume share (a host file or directory the host bound into it, reached over 9p), the pod's
//! `/dev/shm` (one guest tmpfs for the pod), a copy of a small host file the host wrote with
//! `WriteFile` (backends without a shared filesystem), or a directory of the pod in the guest
//! (an emptyDir). A bind mount the host did not list is refused, naming it, rather than binding
//! whatever the guest happens to have at that path.

use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use yard_agent_protocol::{
    COPY_DIR, MAX_COPIED_ENTRIES, MAX_COPIED_FILE, MAX_VOLUME_NAME, POD_DIRS, POD_SHM,
    VOLUME_MOUNT, Volume, WriteDirRequest, WriteFileRequest,
};

use crate::error::{Error, Result};

/// What the rewritten spec needs in the guest first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    pub share: bool,
    pub pod_shm: bool,
    /// Copies the host must have written (their names).
    pub copies: Vec<String>,
    /// The pod's directories to make if missing (their names).
    pub pod_dirs: Vec<String>,
}

impl Needs {
    /// Checks the copies are there and makes the pod's directories (mode 0777, as kubelet makes
    /// an emptyDir).
    pub fn prepare(&self) -> Result<()> {
        for name in &self.copies {
            let path = Path::new(COPY_DIR).join(name);
            if !path.exists() {
                return Err(Error::InvalidArgument(format!(
                    "volumes: copied: {name:?}: the host wrote no such file"
                )));
            }
        }
        for name in &self.pod_dirs {
            let path = Path::new(POD_DIRS).join(name);
            if path.is_dir() {
                continue;
            }
            std::fs::create_dir_all(&path)
                .map_err(Error::io(format!("create {}", path.display())))?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
                .map_err(Error::io(format!("chmod {}", path.display())))?;
        }
        Ok(())
    }
}

/// The copy `name` under `dir`, if `name` is one path component.
fn copy_path(dir: &Path, name: &str) -> Result<PathBuf> {
    if !one_component(name) {
        return Err(Error::InvalidArgument(format!(
            "name: {:?} is not one path component of at most {MAX_VOLUME_NAME} bytes",
            name.chars().take(MAX_VOLUME_NAME + 1).collect::<String>()
        )));
    }
    Ok(dir.join(name))
}

fn check_mode(field: &str, mode: u32) -> Result<()> {
    if mode > 0o777 {
        return Err(Error::InvalidArgument(format!(
            "{field}: {mode:o} is more than permission bits"
        )));
    }
    Ok(())
}

/// Removes whatever is at `path` (a tree without following its symlinks).
fn remove_any(path: &Path) -> Result<()> {
    let gone = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    gone.map_err(Error::io(format!("remove {}", path.display())))
}

/// Writes `data` into the file at `path` in place (a bind of it keeps the inode and reads the
/// new content), never through a symlink.
fn write_in_place(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    f.write_all(data)
        .and_then(|()| f.set_len(data.len() as u64))
        .map_err(Error::io(format!("write {}", path.display())))
}

/// `WriteFile`: the copy `req.name` under `dir` rewritten in place (a container that binds it
/// keeps the same inode and reads the new content), or removed (a tree too).
pub fn write_copy(dir: &Path, req: &WriteFileRequest) -> Result<()> {
    let path = copy_path(dir, &req.name)?;
    if req.remove {
        return remove_any(&path);
    }
    if req.data.len() > MAX_COPIED_FILE {
        return Err(Error::InvalidArgument(format!(
            "data: {} bytes, more than the {MAX_COPIED_FILE} a copied file may have",
            req.data.len()
        )));
    }
    check_mode("mode", req.mode)?;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    write_in_place(&path, &req.data, req.mode)
}

/// Checks a `WriteDir` request's bounds and entries.
fn check_tree(req: &WriteDirRequest) -> Result<HashSet<PathBuf>> {
    if req.entries.len() > MAX_COPIED_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "entries: {}, more than the {MAX_COPIED_ENTRIES} a copied directory may have",
            req.entries.len()
        )));
    }
    let bytes: usize = req.entries.iter().map(|e| e.data.len()).sum();
    if bytes > MAX_COPIED_FILE {
        return Err(Error::InvalidArgument(format!(
            "entries: {bytes} bytes of files, more than the {MAX_COPIED_FILE} a copied \
             directory may have"
        )));
    }
    let mut keep = HashSet::new();
    for (i, e) in req.entries.iter().enumerate() {
        let rel = Path::new(&e.path);
        let plain = !e.path.is_empty()
            && e.path.len() <= 4096
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(n) if n.len() <= 255 && n != ".yard-swap"));
        if !plain {
            return Err(Error::InvalidArgument(format!(
                "entries[{i}].path: {:?} is not a relative path of plain components",
                e.path.chars().take(256).collect::<String>()
            )));
        }
        check_mode(&format!("entries[{i}].mode"), e.mode)?;
        let kinds = [e.dir, !e.symlink.is_empty(), !e.data.is_empty()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(Error::InvalidArgument(format!(
                "entries[{i}]: a directory, a symlink or a file, not more than one"
            )));
        }
        keep.insert(rel.to_owned());
    }
    Ok(keep)
}

/// `WriteDir`: the copy `req.name` under `dir` made to match the tree: directories and files
/// first (files in place), then symlinks (swapped by a rename), then what is gone removed. No entry's
/// parent may be a symlink, so a container that wrote into a writable copy cannot redirect the
/// agent's writes.
pub fn write_tree(dir: &Path, req: &WriteDirRequest) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let root = copy_path(dir, &req.name)?;
    let keep = check_tree(req)?;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    if !std::fs::symlink_metadata(&root).is_ok_and(|m| m.is_dir()) {
        remove_any(&root)?;
        std::fs::create_dir(&root).map_err(Error::io(format!("create {}", root.display())))?;
    }
    // Directories and files first, symlinks after (kubelet's `..data` swap then finds its new
    // version complete), removals last.
    let (links, others): (Vec<_>, Vec<_>) = req
        .entries
        .iter()
        .enumerate()
        .partition(|(_, e)| !e.symlink.is_empty());
    for (i, e) in others.into_iter().chain(links) {
        let rel = Path::new(&e.path);
        let mut parent = root.clone();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            parent.push(c);
            if !std::fs::symlink_metadata(&parent).is_ok_and(|m| m.is_dir()) {
                return Err(Error::InvalidArgument(format!(
                    "entries[{i}].path: {} does not come after its parent directory",
                    e.path
                )));
            }
        }
        let target = root.join(rel);
        let now = std::fs::symlink_metadata(&target).ok();
        if e.dir {
            if !now.as_ref().is_some_and(|m| m.is_dir()) {
                remove_any(&target)?;
                std::fs::create_dir(&target)
                    .map_err(Error::io(format!("create {}", target.display())))?;
            }
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(e.mode))
                .map_err(Error::io(format!("chmod {}", target.display())))?;
        } else if !e.symlink.is_empty() {
            let same = now.as_ref().is_some_and(|m| m.is_symlink())
                && std::fs::read_link(&target).is_ok_and(|t| t == Path::new(&e.symlink));
            if !same {
                let tmp = parent.join(".yard-swap");
                remove_any(&tmp)?;
                std::os::unix::fs::symlink(&e.symlink, &tmp)
                    .map_err(Error::io(format!("symlink {}", tmp.display())))?;
                if now.as_ref().is_some_and(|m| m.is_dir()) {
                    remove_any(&target)?;
                }
                std::fs::rename(&tmp, &target)
                    .map_err(Error::io(format!("rename onto {}", target.display())))?;
            }
        } else {
            if now.as_ref().is_some_and(|m| !m.is_file()) {
                remove_any(&target)?;
            }
            write_in_place(&target, &e.data, e.mode)?;
        }
    }
    remove_stale(&root, Path::new(""), &keep)
}

/// Removes what under `root/rel` is not in `keep` (not following symlinks).
fn remove_stale(root: &Path, rel: &Path, keep: &HashSet<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(Error::io(format!("read {}", dir.display())))?;
    for e in entries.flatten() {
        let r = rel.join(e.file_name());
        if !keep.contains(&r) {
            remove_any(&root.join(&r))?;
        } else if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_stale(root, &r, keep)?;
        }
    }
    Ok(())
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    switchyard_base::mount::is_bind(
        m.typ().as_deref(),
        m.options().as_deref().unwrap_or_default(),
    )
}

/// Points each listed bind mount of `spec` at its source in the guest; errors name the field.
pub fn apply(spec: &mut Spec, volumes: &[Volume]) -> Result<Needs> {
    let mut needs = Needs::default();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut given = HashSet::new();
    for (i, v) in volumes.iter().enumerate() {
        let index = v.mount as usize;
        let Some(m) = mounts.get_mut(index) else {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: {index} is not a mount of the spec ({} mounts)",
                mounts.len()
            )));
        };
        if !given.insert(index) {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: mounts[{index}] is given twice"
            )));
        }
        if !is_bind(m) {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}].mount: mounts[{index}] is not a bind mount"
            )));
        }
        let named = |field: &str, name: &str| -> Result<String> {
            if !one_component(name) {
                return Err(Error::InvalidArgument(format!(
                    "volumes[{i}].{field}: {:?} is not one path component of at most \
                     {MAX_VOLUME_NAME} bytes",
                    name.chars().take(MAX_VOLUME_NAME + 1).collect::<String>()
                )));
            }
            Ok(name.to_owned())
        };
        let set = [
            !v.shared.is_empty(),
            v.pod_shm,
            !v.copied.is_empty(),
            !v.pod_dir.is_empty(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(Error::InvalidArgument(format!(
                "volumes[{i}]: exactly one of shared, pod_shm, copied and pod_dir must be set"
            )));
        }
        let source = if v.pod_shm {
            needs.pod_shm = true;
            PathBuf::from(POD_SHM)
        } else if !v.shared.is_empty() {
            needs.share = true;
            Path::new(VOLUME_MOUNT).join(named("shared", &v.shared)?)
        } else if !v.copied.is_empty() {
            let name = named("copied", &v.copied)?;
            let path = Path::new(COPY_DIR).join(&name);
            needs.copies.push(name);
            path
        } else {
            let name = named("pod_dir", &v.pod_dir)?;
            let path = Path::new(POD_DIRS).join(&name);
            needs.pod_dirs.push(name);
            path
        };
        m.set_source(Some(source));
        m.set_typ(Some("bind".into()));
    }
    for (index, m) in mounts.iter().enumerate() {
        if is_bind(m) && !given.contains(&index) {
            return Err(Error::InvalidArgument(format!(
                "mounts[{index}]: bind mount of {} into {}: the host gave the guest no source \
                 for it",
                m.source()
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                m.destination().display()
            )));
        }
    }
    spec.set_mounts(Some(mounts));
    Ok(needs)
}

fn one_component(name: &str) -> bool {
    let mut c = Path::new(name).components();
    name.len() <= MAX_VOLUME_NAME
        && !name.contains('/')
        && matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        serde_json::from_str(
            r#"{"ociVersion": "1.0.2",
                "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "mounts": [
                  {"destination": "/proc", "type": "proc", "source": "proc"},
                  {"destination": "/dev/shm", "type": "bind", "source": "/run/c/sandboxes/p/shm",
                   "options": ["rbind", "ro"]},
                  {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/c/hosts",
                   "options": ["rbind", "rprivate", "rw"]},
                  {"destination": "/data", "source": "/srv/data", "options": ["rbind"]}
                ]}"#,
        )
        .unwrap()
    }

    fn shared(mount: u32, name: &str) -> Volume {
        Volume {
            mount,
            shared: name.into(),
            ..Default::default()
        }
    }

    fn shm(mount: u32) -> Volume {
        Volume {
            mount,
            pod_shm: true,
            ..Default::default()
        }
    }

    #[test]
    fn listed_binds_get_guest_sources() {
        let mut s = spec();
        let needs = apply(&mut s, &[shm(1), shared(2, "3"), shared(3, "4")]).unwrap();
        assert_eq!(
            needs,
            Needs {
                share: true,
                pod_shm: true,
                ..Needs::default()
            }
        );
        let m = s.mounts().as_ref().unwrap();
        let sources: Vec<_> = m.iter().map(|m| m.source().clone().unwrap()).collect();
        assert_eq!(
            sources,
            [
                PathBuf::from("proc"),
                PathBuf::from("/run/yard/shm"),
                PathBuf::from("/run/yard/vol/3"),
                PathBuf::from("/run/yard/vol/4"),
            ]
        );
        assert_eq!(m[3].typ().as_deref(), Some("bind"));
        assert_eq!(
            m[1].options().as_ref().unwrap(),
            &["rbind".to_owned(), "ro".to_owned()]
        );
    }

    #[test]
    fn bad_volumes_and_unlisted_binds_are_named() {
        let cases: Vec<(Vec<Volume>, &str)> = vec![
            (
                vec![shm(1), shared(2, "a")],
                "mounts[3]: bind mount of /srv/data",
            ),
            (vec![shared(9, "a")], "volumes[0].mount: 9 is not a mount"),
            (
                vec![shared(0, "a")],
                "volumes[0].mount: mounts[0] is not a bind",
            ),
            (
                vec![shm(1), shm(1)],
                "volumes[1].mount: mounts[1] is given twice",
            ),
            (vec![shared(2, "../x")], "volumes[0].shared: "),
            (vec![shared(2, "a/b")], "volumes[0].shared: "),
            (vec![shared(2, ".")], "volumes[0].shared: "),
            (vec![shared(2, &"x".repeat(65))], "volumes[0].shared: "),
            (vec![shared(2, "")], "volumes[0]: exactly one"),
            (
                vec![Volume {
                    mount: 2,
                    copied: "../etc/passwd".into(),
                    ..Default::default()
                }],
                "volumes[0].copied: ",
            ),
            (
                vec![Volume {
                    mount: 3,
                    pod_dir: "a".into(),
                    copied: "b".into(),
                    ..Default::default()
                }],
                "volumes[0]: exactly one",
            ),
            (
                vec![Volume {
                    mount: 2,
                    shared: "a".into(),
                    pod_shm: true,
                    ..Default::default()
                }],
                "volumes[0]: exactly one",
            ),
        ];
        for (volumes, want) in cases {
            match apply(&mut spec(), &volumes) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m} vs {want}"),
                other => panic!("{volumes:?}: {other:?}"),
            }
        }
    }

    /// Issue 18, backends without a shared filesystem: copies and the pod's directories.
    #[test]
    fn copied_files_and_pod_dirs_get_guest_sources() {
        let mut s = spec();
        let v = |mount: u32, copied: &str, pod_dir: &str| Volume {
            mount,
            copied: copied.into(),
            pod_dir: pod_dir.into(),
            ..Default::default()
        };
        let needs = apply(&mut s, &[shm(1), v(2, "0", ""), v(3, "", "1")]).unwrap();
        assert_eq!(needs.copies, ["0"]);
        assert_eq!(needs.pod_dirs, ["1"]);
        assert!(!needs.share);
        let m = s.mounts().as_ref().unwrap();
        assert_eq!(
            m[2].source().as_deref(),
            Some(Path::new("/run/yard/files/0"))
        );
        assert_eq!(m[3].source().as_deref(), Some(Path::new("/run/yard/pod/1")));
    }

    #[test]
    fn a_copy_is_rewritten_in_place_bounded_and_removed() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        let req = |name: &str, data: &[u8], remove: bool| WriteFileRequest {
            name: name.into(),
            data: data.to_vec(),
            mode: 0o644,
            remove,
            ..Default::default()
        };
        write_copy(
            &files,
            &req("0", b"nameserver 10.0.0.10\nsearch a b c\n", false),
        )
        .unwrap();
        let inode = std::fs::metadata(files.join("0")).unwrap().ino();
        write_copy(&files, &req("0", b"nameserver 10.0.0.11\n", false)).unwrap();
        let meta = std::fs::metadata(files.join("0")).unwrap();
        assert_eq!(
            meta.ino(),
            inode,
            "rewritten in place: a bind of it sees the change"
        );
        assert_eq!(meta.mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read(files.join("0")).unwrap(),
            b"nameserver 10.0.0.11\n"
        );
        for (r, want) in [
            (req("../x", b"", false), "name: "),
            (req("a/b", b"", false), "name: "),
            (
                req("big", &vec![0; MAX_COPIED_FILE + 1], false),
                "data: 1048577 bytes",
            ),
            (
                WriteFileRequest {
                    mode: 0o4755,
                    ..req("m", b"", false)
                },
                "mode: 4755",
            ),
        ] {
            match write_copy(&files, &r) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m} vs {want}"),
                other => panic!("{}: {other:?}", r.name),
            }
        }
        assert!(!files.join("big").exists());
        // A symlink planted at a copy's name is not followed.
        std::os::unix::fs::symlink("/etc/passwd", files.join("s")).unwrap();
        assert!(write_copy(&files, &req("s", b"x", false)).is_err());
        write_copy(&files, &req("0", b"", true)).unwrap();
        assert!(!files.join("0").exists());
        write_copy(&files, &req("0", b"", true)).unwrap();
    }

    fn entry(path: &str, dir: bool, symlink: &str, data: &[u8]) -> yard_agent_protocol::DirEntry {
        yard_agent_protocol::DirEntry {
            path: path.into(),
            dir,
            symlink: symlink.into(),
            data: data.to_vec(),
            mode: if dir { 0o755 } else { 0o644 },
            ..Default::default()
        }
    }

    /// kubelet's atomic-writer layout: a timestamped directory, `..data` pointing at it, and
    /// each key a symlink through `..data`.
    fn configmap(stamp: &str, content: &[u8]) -> Vec<yard_agent_protocol::DirEntry> {
        vec![
            entry(stamp, true, "", b""),
            entry(&format!("{stamp}/app.conf"), false, "", content),
            entry("..data", false, stamp, b""),
            entry("app.conf", false, "..data/app.conf", b""),
        ]
    }

    /// Issue 18: a configmap directory's copy follows kubelet's updates (the `..data` swap) and
    /// drops what is gone; bad trees are refused naming the entry; a symlink planted in the
    /// copy is replaced, never followed.
    #[test]
    fn a_copied_tree_follows_the_host_and_never_follows_planted_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        let req = |entries| WriteDirRequest {
            name: "cm".into(),
            entries,
            ..Default::default()
        };
        write_tree(&files, &req(configmap("..2024_1", b"v1"))).unwrap();
        let root = files.join("cm");
        assert_eq!(std::fs::read(root.join("app.conf")).unwrap(), b"v1");
        write_tree(&files, &req(configmap("..2024_2", b"v2"))).unwrap();
        assert_eq!(std::fs::read(root.join("app.conf")).unwrap(), b"v2");
        assert!(
            !root.join("..2024_1").exists(),
            "the old version is removed"
        );
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["..2024_2", "..data", "app.conf"]);

        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        let mut planted = configmap("..2024_2", b"v2");
        planted.push(entry("evil", true, "", b""));
        planted.push(entry("evil/f", false, "", b"x"));
        write_tree(&files, &req(planted)).unwrap();
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert!(
            std::fs::symlink_metadata(root.join("evil"))
                .unwrap()
                .is_dir()
        );

        for (entries, want) in [
            (vec![entry("../x", false, "", b"")], "entries[0].path: "),
            (vec![entry("/etc/x", false, "", b"")], "entries[0].path: "),
            (
                vec![entry("a/b", false, "", b"x")],
                "entries[0].path: a/b does not come",
            ),
            (
                vec![entry("a", true, "b", b"")],
                "entries[0]: a directory, a symlink or a file",
            ),
            (
                vec![entry("a", false, "", &vec![0; MAX_COPIED_FILE + 1])],
                "entries: 1048577 bytes",
            ),
            (
                (0..=MAX_COPIED_ENTRIES)
                    .map(|i| entry(&format!("f{i}"), false, "", b""))
                    .collect(),
                "entries: 257, more than",
            ),
        ] {
            match write_tree(&files, &req(entries)) {
                Err(Error::InvalidArgument(m)) => assert!(m.starts_with(want), "{m} vs {want}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        write_copy(
            &files,
            &WriteFileRequest {
                name: "cm".into(),
                remove: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!root.exists());
    }
}
