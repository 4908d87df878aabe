use std::os::unix::fs::{FileTypeExt, MetadataExt};

use tar::EntryType;

use std::fs;
use std::path::Path;
use std::process::Command;

use nix::mount::MsFlags;

use super::active::parse_key;
use super::chains::snapshot_id;
use super::mount::{Mounted, overlay_has_index};
use super::*;
use crate::unpack::tests::{Layer, gzip, is_root, lower_tree, merged, sha256, tree, upper_tree};

/// The OCI ChainID of `parent` + a layer with diff id `diff_id`.
fn chain_of(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_owned(),
        Some(parent) => sha256(format!("{parent} {diff_id}").as_bytes()),
    }
}

/// A layer with diff id `diff_id`, nothing refused.
fn spec(diff_id: &str) -> super::Layer<'_> {
    super::Layer {
        name: "test-layer",
        diff_id,
        nodes: crate::unpack::Nodes::Allow,
        max_tar_bytes: u64::MAX,
    }
}

/// Opens a snapshotter with `driver`, or says why the test cannot run.
fn open(driver: Driver) -> Option<(tempfile::TempDir, Snapshotter)> {
    if !is_root() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshotter = Snapshotter::open(dir.path(), Some(driver)).unwrap();
    if driver == Driver::Overlay && snapshotter.probe_overlay().is_err() {
        eprintln!("skipped: overlayfs cannot be mounted here");
        return None;
    }
    Some((dir, snapshotter))
}

/// Commits the two-layer test image; returns `(base, child)` chain ids.
fn commit_two(s: &Snapshotter) -> (String, String) {
    let (lower, upper) = (lower_tree(), upper_tree());
    let (d1, d2) = (sha256(&lower), sha256(&upper));
    let base = chain_of(None, &d1);
    let child = chain_of(Some(&base), &d2);
    let c = s
        .commit_layer(&base, None, &spec(&d1), &gzip(&lower)[..])
        .unwrap();
    assert_eq!(
        (c.chain.as_str(), c.parent.as_deref()),
        (base.as_str(), None)
    );
    let c = s
        .commit_layer(&child, Some(&base), &spec(&d2), &upper[..])
        .unwrap();
    assert_eq!(c.parent.as_deref(), Some(base.as_str()));
    assert!(c.bytes > 0);
    (base, child)
}

/// Mounts `m` as a shim would (containerd's mount helper turns `bind` into `MS_BIND`).
fn mount(m: &Mount, target: &Path) -> Mounted {
    if m.kind == "bind" {
        assert_eq!(m.options, ["rbind", "rw"]);
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
    } else {
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            Some(m.kind.as_str()),
            MsFlags::empty(),
            Some(m.options.join(",").as_str()),
        )
        .unwrap();
    }
    Mounted(target.to_owned())
}

fn scratch_is_empty(s: &Snapshotter) -> bool {
    fs::read_dir(s.root().join(SCRATCH)).unwrap().count() == 0
}

#[test]
fn open_detects_overlayfs_and_clears_dead_scratch() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("tmp/999999999-0-0");
    let ours = dir.path().join(format!("tmp/{}-7-7", std::process::id()));
    fs::create_dir_all(stale.join("fs/sub")).unwrap();
    fs::create_dir_all(&ours).unwrap();
    let s = Snapshotter::open(dir.path(), None).unwrap();
    assert!(!stale.exists());
    assert!(ours.exists(), "a live process's scratch stays");
    fs::remove_dir(&ours).unwrap();
    assert!(scratch_is_empty(&s), "the probe cleans up");
    // A root overlayfs options cannot name.
    let odd = dir.path().join("a:b");
    assert!(Snapshotter::open(&odd, Some(Driver::Overlay)).is_err());
    assert_eq!(
        Snapshotter::open(&odd, None).unwrap().driver(),
        Driver::Copy
    );
    match s.probe_overlay() {
        Ok(()) => assert_eq!(s.driver(), Driver::Overlay),
        Err(e) => {
            eprintln!("overlayfs unavailable ({e}): expecting copies");
            assert_eq!(s.driver(), Driver::Copy);
        }
    }
}

#[test]
fn overlay_commit_prepare_and_remove() {
    let Some((_dir, s)) = open(Driver::Overlay) else {
        return;
    };
    let (base, child) = commit_two(&s);
    assert!(s.exists(&base) && s.exists(&child));
    let committed = s.committed().unwrap();
    assert_eq!(committed.len(), 2);

    // Each snapshot holds its own layer only, whiteouts as overlayfs writes them.
    let child_fs = s
        .root()
        .join(SNAPSHOTS)
        .join(snapshot_id(&child).unwrap())
        .join("fs");
    let whiteout = fs::symlink_metadata(child_fs.join("a/x")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);

    let mounts = s.prepare("default/c1", &child).unwrap();
    assert_eq!(mounts.len(), 1);
    let m = &mounts[0];
    assert_eq!((m.kind.as_str(), m.source.as_str()), ("overlay", "overlay"));
    let base_fs = s
        .root()
        .join(SNAPSHOTS)
        .join(snapshot_id(&base).unwrap())
        .join("fs");
    let active = s.root().join("active/default/c1");
    let mut want = Vec::new();
    if overlay_has_index() {
        want.push("index=off".to_owned());
    }
    want.push(format!(
        "lowerdir={}:{}",
        child_fs.display(),
        base_fs.display()
    ));
    want.push(format!("upperdir={}", active.join("upper").display()));
    want.push(format!("workdir={}", active.join("work").display()));
    assert_eq!(m.options, want);

    let target = tempfile::tempdir().unwrap();
    {
        let _mounted = mount(m, target.path());
        assert_eq!(tree(target.path()), merged());
        fs::write(target.path().join("a/y"), b"changed").unwrap();
    }
    assert_eq!(fs::read(active.join("upper/a/y")).unwrap(), b"changed");
    assert_eq!(
        s.active().unwrap(),
        vec![("default/c1".to_owned(), child.clone())]
    );
    assert!(matches!(
        s.prepare("default/c1", &child),
        Err(SnapshotError::ActiveExists { .. })
    ));

    // A single-layer chain mounts too (upper + one lower).
    let mounts = s.prepare("other/c2", &base).unwrap();
    let target2 = tempfile::tempdir().unwrap();
    {
        let _mounted = mount(&mounts[0], target2.path());
        assert!(target2.path().join("b/z").exists());
    }

    s.remove_active("default/c1").unwrap();
    s.remove_active("default/c1").unwrap();
    s.remove_active("other/c2").unwrap();
    assert!(s.active().unwrap().is_empty());
    assert!(!s.root().join("active/default").exists());
    assert!(scratch_is_empty(&s));

    s.remove(&child).unwrap();
    assert!(!s.exists(&child) && s.exists(&base));
    assert!(matches!(
        s.remove(&child),
        Err(SnapshotError::NotFound { .. })
    ));
}

#[test]
fn copy_commit_prepare_and_remove() {
    let Some((_dir, s)) = open(Driver::Copy) else {
        return;
    };
    let (base, child) = commit_two(&s);
    let child_fs = s
        .root()
        .join(SNAPSHOTS)
        .join(snapshot_id(&child).unwrap())
        .join("fs");
    assert_eq!(
        tree(&child_fs),
        merged(),
        "the merged tree, whiteouts applied"
    );
    let base_fs = s
        .root()
        .join(SNAPSHOTS)
        .join(snapshot_id(&base).unwrap())
        .join("fs");
    assert!(base_fs.join("b/z").exists(), "the parent is untouched");

    let mounts = s.prepare("default/c1", &child).unwrap();
    let fs_dir = s.root().join("active/default/c1/fs");
    assert_eq!(
        mounts,
        vec![Mount {
            kind: "bind".into(),
            source: fs_dir.display().to_string(),
            options: vec!["rbind".into(), "rw".into()],
        }]
    );
    assert_eq!(tree(&fs_dir), merged());
    let target = tempfile::tempdir().unwrap();
    {
        let _mounted = mount(&mounts[0], target.path());
        assert_eq!(tree(target.path()), merged());
    }
    assert_eq!(
        s.active().unwrap(),
        vec![("default/c1".to_owned(), child.clone())]
    );
    s.remove_active("default/c1").unwrap();
    assert!(s.active().unwrap().is_empty());
    assert!(s.exists(&child));
}

#[test]
fn copies_keep_links_owners_modes_xattrs_and_nodes() {
    let Some((_dir, s)) = open(Driver::Copy) else {
        return;
    };
    let layer = Layer::new()
        .entry(EntryType::Directory, "d/", 0o750, b"", |h| {
            h.set_uid(5);
            h.set_mtime(77);
        })
        .pax(&[
            ("SCHILY.xattr.user.k", b"v"),
            (
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
        ])
        .entry(EntryType::Regular, "d/suid", 0o4711, b"bin", |h| {
            h.set_uid(1000);
            h.set_gid(100);
        })
        .hardlink("d/link", "d/suid")
        .symlink("d/sym", "../nowhere")
        .entry(EntryType::Char, "d/null", 0o666, b"", |h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        })
        .entry(EntryType::Fifo, "d/fifo", 0o600, b"", |_| {})
        .finish();
    let d1 = sha256(&layer);
    let base = chain_of(None, &d1);
    s.commit_layer(&base, None, &spec(&d1), &layer[..]).unwrap();
    let empty = Layer::new().finish();
    let d2 = sha256(&empty);
    let child = chain_of(Some(&base), &d2);
    s.commit_layer(&child, Some(&base), &spec(&d2), &empty[..])
        .unwrap();
    s.prepare("ns/copy", &child).unwrap();

    for root in [
        s.root()
            .join(SNAPSHOTS)
            .join(snapshot_id(&child).unwrap())
            .join("fs"),
        s.root().join("active/ns/copy/fs"),
    ] {
        let d = fs::symlink_metadata(root.join("d")).unwrap();
        assert_eq!((d.mode() & 0o7777, d.uid(), d.mtime()), (0o750, 5, 77));
        let suid = fs::symlink_metadata(root.join("d/suid")).unwrap();
        assert_eq!(
            (suid.mode() & 0o7777, suid.uid(), suid.gid()),
            (0o4711, 1000, 100)
        );
        let link = fs::symlink_metadata(root.join("d/link")).unwrap();
        assert_eq!((link.ino(), link.nlink()), (suid.ino(), 2));
        let mut buf = [0u8; 64];
        let n = rfs::lgetxattr(root.join("d/suid"), "user.k", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"v");
        let n = rfs::lgetxattr(root.join("d/suid"), "security.capability", &mut buf[..]).unwrap();
        assert_eq!(n, 20, "file capabilities survive the chown");
        assert_eq!(
            fs::read_link(root.join("d/sym")).unwrap(),
            Path::new("../nowhere")
        );
        let null = fs::symlink_metadata(root.join("d/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rfs::makedev(1, 3));
        assert!(
            fs::symlink_metadata(root.join("d/fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }
}

#[test]
fn failed_commits_leave_nothing() {
    for driver in [Driver::Overlay, Driver::Copy] {
        let Some((_dir, s)) = open(driver) else {
            return;
        };
        let (base, _) = commit_two(&s);
        let layer = Layer::new().file("f", b"data").finish();
        let diff_id = sha256(&layer);
        let chain = chain_of(Some(&base), &diff_id);
        let wrong = sha256(b"other");
        let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
            ("wrong diff id", layer.clone(), wrong.as_str(), Some(&base)),
            (
                "truncated",
                gzip(&layer)[..30].to_vec(),
                diff_id.as_str(),
                Some(&base),
            ),
            (
                "escape",
                Layer::new().file("../x", b"").finish(),
                diff_id.as_str(),
                Some(&base),
            ),
            (
                "missing parent",
                layer.clone(),
                diff_id.as_str(),
                Some(&wrong),
            ),
        ];
        for (what, data, diff, parent) in cases {
            let err = s
                .commit_layer(&chain, parent, &spec(diff), &data[..])
                .unwrap_err();
            let expected = match what {
                "wrong diff id" => matches!(err, SnapshotError::DiffId { .. }),
                "truncated" => matches!(
                    err,
                    SnapshotError::Unpack {
                        source: UnpackError::Corrupt(_),
                        ..
                    }
                ),
                "escape" => matches!(
                    err,
                    SnapshotError::Unpack {
                        source: UnpackError::Escape { .. },
                        ..
                    }
                ),
                _ => matches!(err, SnapshotError::NotFound { .. }),
            };
            assert!(expected, "{driver:?} {what}: {err}");
            assert!(!s.exists(&chain), "{driver:?} {what}");
            assert_eq!(
                fs::read_dir(s.root().join(SNAPSHOTS)).unwrap().count(),
                2,
                "{driver:?} {what}"
            );
            assert!(scratch_is_empty(&s), "{driver:?} {what}");
        }
        let err = s
            .commit_with("sha256:0123456789abcdef0000", None, |_| {
                Err(io::Error::other("no"))
            })
            .unwrap_err();
        assert!(matches!(err, SnapshotError::Io { .. }), "{err}");
        assert!(scratch_is_empty(&s));
    }
}

#[test]
fn concurrent_commits_of_one_chain_all_succeed() {
    for driver in [Driver::Overlay, Driver::Copy] {
        let Some((_dir, s)) = open(driver) else {
            return;
        };
        let (base, _) = commit_two(&s);
        let layer = Layer::new()
            .dir("many/")
            .file("many/a", &[7u8; 100_000])
            .file("many/b", b"b")
            .finish();
        let diff_id = sha256(&layer);
        let chain = chain_of(Some(&base), &diff_id);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| s.commit_layer(&chain, Some(&base), &spec(&diff_id), &layer[..]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for result in results {
            let c = result.unwrap();
            assert_eq!(
                (c.chain.as_str(), c.parent.as_deref()),
                (chain.as_str(), Some(base.as_str()))
            );
        }
        assert_eq!(fs::read_dir(s.root().join(SNAPSHOTS)).unwrap().count(), 3);
        assert!(scratch_is_empty(&s));
        // Committing it again reads what is there.
        let again = s
            .commit_layer(&chain, Some(&base), &spec(&diff_id), &b""[..])
            .unwrap();
        assert_eq!(again.chain, chain);
    }
}

#[test]
fn id_prefix_collisions_are_errors() {
    let Some((_dir, s)) = open(Driver::Copy) else {
        return;
    };
    let first = format!("sha256:{}{}", "ab".repeat(8), "0".repeat(48));
    let second = format!("sha256:{}{}", "ab".repeat(8), "1".repeat(48));
    s.commit_with(&first, None, |fs| std::fs::write(fs.join("x"), b"1"))
        .unwrap();
    let err = s.commit_with(&second, None, |_| Ok(())).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
        "{err}"
    );
    assert!(s.exists(&first) && !s.exists(&second));
    assert!(matches!(
        s.prepare("a/b", &second),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        s.image(&second),
        Err(SnapshotError::NotFound { .. })
    ));
}

#[test]
fn keys_and_chain_ids_are_checked() {
    for key in [
        "default/c1",
        "k8s.io/abc_DEF-1.2",
        &format!("a/{}", "x".repeat(76)),
    ] {
        assert!(parse_key(key).is_ok(), "{key}");
    }
    for key in [
        "nokey",
        "/x",
        "x/",
        "a/b/c",
        "a/../b",
        "../x",
        "a/.hidden",
        "a/-x",
        "a/b c",
        &format!("a/{}", "x".repeat(77)),
    ] {
        assert!(
            matches!(parse_key(key), Err(SnapshotError::BadKey { .. })),
            "{key}"
        );
    }
    assert_eq!(
        snapshot_id(&format!("sha256:{}", "0123456789abcdef".repeat(4))).unwrap(),
        "0123456789abcdef"
    );
    for chain in [
        "sha256",
        "sha256:abc",
        "sha256:../../../etc/passwd00",
        ":0123456789abcdef",
        "SHA256:0123456789abcdef",
        "sha256:0123456789ABCDEF",
    ] {
        assert!(snapshot_id(chain).is_err(), "{chain}");
    }
    if let Some((_dir, s)) = open(Driver::Copy) {
        assert!(matches!(
            s.prepare("bad key", "sha256:0"),
            Err(SnapshotError::BadKey { .. })
        ));
        assert!(matches!(
            s.remove_active("../x"),
            Err(SnapshotError::BadKey { .. })
        ));
        assert!(matches!(
            s.commit_with("nope", None, |_| Ok(())),
            Err(SnapshotError::BadKey { .. })
        ));
        assert!(!s.exists("nope"));
    }
}

#[test]
fn images_of_chains_longer_than_a_page_of_mount_options() {
    let Some((_dir, s)) = open(Driver::Overlay) else {
        return;
    };
    let mut parent: Option<String> = None;
    let layers = 120;
    for i in 0..layers {
        let layer = Layer::new().file(&format!("f{i}"), b"x").finish();
        let diff_id = sha256(&layer);
        let chain = chain_of(parent.as_deref(), &diff_id);
        s.commit_layer(&chain, parent.as_deref(), &spec(&diff_id), &layer[..])
            .unwrap();
        parent = Some(chain);
    }
    let top = parent.unwrap();
    let lowerdir = s.lowers(&top).unwrap().len()
        * s.root()
            .join("snapshots/0123456789abcdef/fs")
            .as_os_str()
            .len();
    assert!(lowerdir > MOUNT_DATA_MAX);
    let image = match s.image(&top) {
        Ok(image) => image,
        Err(e) => {
            eprintln!("skipped: long chains need `lowerdir+` (Linux 6.8+): {e}");
            return;
        }
    };
    assert_erofs(&image);
    if let Some(view) = erofs_tree(&image) {
        assert_eq!(view.len(), layers);
    }
}

/// The EROFS superblock sits at offset 1024 and starts with its magic.
fn assert_erofs(path: &Path) {
    let data = fs::read(path).unwrap();
    assert!(data.len() > 1028);
    assert_eq!(
        u32::from_le_bytes(data[1024..1028].try_into().unwrap()),
        0xE0F5_E1E2
    );
}

/// Mounts an EROFS image file (file-backed mounts: Linux 6.12+) and lists it.
fn erofs_tree(image: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    let target = tempfile::tempdir().unwrap();
    if let Err(e) = nix::mount::mount(
        Some(image),
        target.path(),
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        eprintln!("not checking the image's contents: cannot mount EROFS files here: {e}");
        return None;
    }
    let _mounted = Mounted(target.path().to_owned());
    Some(tree(target.path()))
}

#[test]
fn images_are_built_once_and_hold_the_merged_tree() {
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        eprintln!("skipped: mkfs.erofs is not installed");
        return;
    }
    for driver in [Driver::Overlay, Driver::Copy] {
        let Some((_dir, s)) = open(driver) else {
            return;
        };
        let (base, child) = commit_two(&s);
        let image = s.image(&child).unwrap();
        assert_eq!(
            image,
            s.root()
                .join(EROFS)
                .join(format!("{}.erofs", snapshot_id(&child).unwrap()))
        );
        assert_erofs(&image);
        let inode = fs::metadata(&image).unwrap().ino();
        assert_eq!(s.image(&child).unwrap(), image);
        assert_eq!(
            fs::metadata(&image).unwrap().ino(),
            inode,
            "{driver:?}: reused"
        );
        if let Some(view) = erofs_tree(&image) {
            assert_eq!(view, merged(), "{driver:?}: no whiteouts in the image");
        }
        // A single layer (overlay: mounted over an empty second lower).
        let image = s.image(&base).unwrap();
        assert_erofs(&image);
        if let Some(view) = erofs_tree(&image) {
            assert!(view.contains_key("b/z") && view.contains_key("o/sub/old2"));
        }
        // Concurrent builders of one image share it.
        let (d, layer) = {
            let layer = Layer::new().file("x", b"x").finish();
            (sha256(&layer), layer)
        };
        let third = chain_of(Some(&child), &d);
        s.commit_layer(&third, Some(&child), &spec(&d), &layer[..])
            .unwrap();
        let paths: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| s.image(&third).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(paths.iter().all(|p| *p == paths[0]));
        assert_erofs(&paths[0]);
        assert!(scratch_is_empty(&s), "{driver:?}");

        s.remove(&third).unwrap();
        assert!(!paths[0].exists(), "{driver:?}: remove deletes the image");
        assert!(matches!(
            s.image(&third),
            Err(SnapshotError::NotFound { .. })
        ));
    }
}
