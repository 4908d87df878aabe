use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use rustix::fs as rfs;
use rustix::io::Errno;

use super::meta::parse_pax_time;
use super::*;

pub(crate) fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
    false
}

/// A layer tarball written entry by entry, with raw names where a test needs them.
pub(crate) struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub(crate) fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, name: &[u8], mode: u32) -> Header {
        let mut header = Header::new_gnu();
        // Raw bytes: `set_path` refuses `..`, which is what some tests need.
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        header.set_size(0);
        header
    }

    /// Appends one entry; `edit` adjusts the header first.
    pub(crate) fn entry(
        mut self,
        kind: EntryType,
        name: &str,
        mode: u32,
        data: &[u8],
        edit: impl FnOnce(&mut Header),
    ) -> Self {
        let mut header = Self::header(kind, name.as_bytes(), mode);
        header.set_size(data.len() as u64);
        edit(&mut header);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub(crate) fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(EntryType::Regular, name, 0o644, data, |_| {})
    }

    pub(crate) fn dir(self, name: &str) -> Self {
        self.entry(EntryType::Directory, name, 0o755, b"", |_| {})
    }

    pub(crate) fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, name, 0o777, b"", |h| {
            h.set_link_name_literal(target).unwrap()
        })
    }

    pub(crate) fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Link, name, 0o644, b"", |h| {
            h.set_link_name_literal(target).unwrap()
        })
    }

    /// A PAX extended header for the next entry.
    pub(crate) fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body + body.to_string().len();
            if len.to_string().len() + body != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        self.entry(EntryType::XHeader, "PaxHeaders/x", 0o644, &data, |_| {})
    }

    /// Whatever `f` appends with the builder itself (long names, links).
    pub(crate) fn with(mut self, f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Self {
        f(&mut self.builder);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

pub(crate) fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Bytes gzip cannot shrink, so a cut lands where it is aimed.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// `path → kind` for a whole tree: `f:<content>`, `d`, `l:<target>`, `c:<maj>:<min>`, `p`.
pub(crate) fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                walk(root, &path, out);
                "d".to_owned()
            } else if ft.is_symlink() {
                format!("l:{}", fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                format!("f:{}", String::from_utf8_lossy(&fs::read(&path).unwrap()))
            } else if ft.is_char_device() {
                let dev = meta.rdev();
                format!("c:{}:{}", rfs::major(dev), rfs::minor(dev))
            } else {
                "p".to_owned()
            };
            out.insert(rel, kind);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn expect(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn sample() -> Vec<u8> {
    Layer::new()
        .dir("etc/")
        .file("etc/hostname", b"yard\n")
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("etc/hostname2", "etc/hostname")
        .file("./usr/bin/implicit-parents", b"#!/bin/sh\n")
        .finish()
}

#[test]
fn plain_gzip_and_zstd_layers_have_the_plain_tars_diff_id() {
    if !is_root() {
        return;
    }
    let tar = sample();
    let want = sha256(&tar);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (what, layer) in [("plain", tar.clone()), ("gzip", gzip(&tar)), ("zstd", zst)] {
        let dir = tempfile::tempdir().unwrap();
        let applied =
            apply_layer(&layer[..], dir.path(), &Options::new(Whiteouts::Overlay)).unwrap();
        assert_eq!(applied.diff_id, want, "{what}");
        assert_eq!(applied.tar_bytes, tar.len() as u64, "{what}");
        assert_eq!(
            tree(dir.path()),
            expect(&[
                ("etc", "d"),
                ("etc/hostname", "f:yard\n"),
                ("etc/hostname2", "f:yard\n"),
                ("etc/localtime", "l:/usr/share/zoneinfo/UTC"),
                ("usr", "d"),
                ("usr/bin", "d"),
                ("usr/bin/implicit-parents", "f:#!/bin/sh\n"),
            ]),
            "{what}"
        );
        let a = fs::metadata(dir.path().join("etc/hostname")).unwrap();
        let b = fs::metadata(dir.path().join("etc/hostname2")).unwrap();
        assert_eq!(a.ino(), b.ino(), "{what}: hard link");
        let implicit = fs::metadata(dir.path().join("usr/bin")).unwrap();
        assert_eq!(implicit.permissions().mode() & 0o7777, 0o755);
    }
}

#[test]
fn empty_stream_is_an_empty_layer() {
    let dir = tempfile::tempdir().unwrap();
    let applied = apply_layer(&b""[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap();
    assert_eq!(applied.tar_bytes, 0);
    assert_eq!(applied.diff_id, sha256(b""));
}

#[test]
fn ownership_modes_times_xattrs_and_nodes_are_kept() {
    if !is_root() {
        return;
    }
    let layer = Layer::new()
        .entry(EntryType::Directory, "tmp/", 0o1777, b"", |h| {
            h.set_mtime(1_000_000)
        })
        .pax(&[
            ("SCHILY.xattr.user.yard", b"value"),
            ("SCHILY.xattr.trusted.yard", b"\x00\x01"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            ("mtime", b"1234567.25"),
        ])
        .entry(EntryType::Regular, "tmp/suid", 0o4755, b"x", |h| {
            h.set_uid(1000);
            h.set_gid(1001);
        })
        .entry(EntryType::Regular, "tmp/sgid", 0o2711, b"x", |h| {
            h.set_gid(50);
        })
        .pax(&[("SCHILY.xattr.trusted.link", b"l")])
        .entry(EntryType::Symlink, "tmp/link", 0o777, b"", |h| {
            h.set_link_name_literal("suid").unwrap();
            h.set_uid(7);
            h.set_gid(8);
            h.set_mtime(42);
        })
        .entry(EntryType::Fifo, "tmp/fifo", 0o620, b"", |h| h.set_uid(3))
        .entry(EntryType::Char, "tmp/null", 0o666, b"", |h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        })
        .entry(EntryType::Block, "tmp/loop9", 0o660, b"", |h| {
            h.set_device_major(7).unwrap();
            h.set_device_minor(9).unwrap();
        })
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    apply_layer(&layer[..], root, &Options::new(Whiteouts::Overlay)).unwrap();

    let tmp = fs::symlink_metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(
        tmp.mtime(),
        1_000_000,
        "directory mtime set after its contents"
    );

    let suid = fs::symlink_metadata(root.join("tmp/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    assert_eq!((suid.uid(), suid.gid()), (1000, 1001));
    assert_eq!((suid.mtime(), suid.mtime_nsec()), (1_234_567, 250_000_000));
    let mut buf = [0u8; 16];
    let n = rfs::lgetxattr(root.join("tmp/suid"), "user.yard", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"value");
    let n = rfs::lgetxattr(root.join("tmp/suid"), "trusted.yard", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"\x00\x01");
    let redirect = rfs::lgetxattr(
        root.join("tmp/suid"),
        "trusted.overlay.redirect",
        &mut buf[..],
    );
    assert_eq!(
        redirect,
        Err(Errno::NODATA),
        "overlayfs xattrs from a layer are dropped"
    );

    let sgid = fs::symlink_metadata(root.join("tmp/sgid")).unwrap();
    assert_eq!(sgid.mode() & 0o7777, 0o2711);
    assert_eq!(sgid.gid(), 50);
    assert_eq!(sgid.mtime(), 1_600_000_000);

    let link = fs::symlink_metadata(root.join("tmp/link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!((link.uid(), link.gid(), link.mtime()), (7, 8, 42));
    let n = rfs::lgetxattr(root.join("tmp/link"), "trusted.link", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"l");

    let fifo = fs::symlink_metadata(root.join("tmp/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!((fifo.mode() & 0o7777, fifo.uid()), (0o620, 3));
    let null = fs::symlink_metadata(root.join("tmp/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!((rfs::major(null.rdev()), rfs::minor(null.rdev())), (1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let block = fs::symlink_metadata(root.join("tmp/loop9")).unwrap();
    assert!(block.file_type().is_block_device());
    assert_eq!((rfs::major(block.rdev()), rfs::minor(block.rdev())), (7, 9));
}

#[test]
fn dot_dot_entries_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    for name in [
        "../../etc/passwd",
        "../outside/pwned",
        "a/../../outside/pwned",
        "..",
    ] {
        let layer = Layer::new().file(name, b"pwned").finish();
        let err = apply_layer(&layer[..], &root, &Options::new(Whiteouts::Remove)).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Escape { entry, .. } if entry == name),
            "{name}: {err}"
        );
    }
    let layer = Layer::new()
        .file("x", b"")
        .hardlink("hl", "../outside/pwned")
        .finish();
    let err = apply_layer(&layer[..], &root, &Options::new(Whiteouts::Remove)).unwrap_err();
    assert!(
        matches!(&err, UnpackError::Escape { entry, .. } if entry == "hl"),
        "{err}"
    );
    let layer = Layer::new().file("a/.wh...", b"").finish();
    let err = apply_layer(&layer[..], &root, &Options::new(Whiteouts::Remove)).unwrap_err();
    assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn absolute_paths_and_symlinks_resolve_inside_the_root() {
    if !is_root() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host").unwrap();
    let outside_abs = outside.to_str().unwrap();

    // The lower layer: symlinks that would leave the root if followed from the host.
    let lower = Layer::new()
        .dir("etc/")
        .symlink("slash", "/")
        .symlink("up", "../..")
        .symlink("abs", outside_abs)
        .symlink("etc/up", "../../../outside")
        .finish();
    apply_layer(&lower[..], &root, &Options::new(Whiteouts::Remove)).unwrap();

    let mut results = Vec::new();
    for (name, layer) in [
        (
            "/etc/passwd",
            Layer::new().file("/etc/passwd", b"1").finish(),
        ),
        (
            "slash/etc/shadow",
            Layer::new().file("slash/etc/shadow", b"2").finish(),
        ),
        (
            "up/etc/group",
            Layer::new().file("up/etc/group", b"3").finish(),
        ),
        ("abs/pwned", Layer::new().file("abs/pwned", b"4").finish()),
        (
            "etc/up/pwned",
            Layer::new().file("etc/up/pwned", b"5").finish(),
        ),
        (
            "same-layer/x",
            Layer::new()
                .symlink("same-layer", outside_abs)
                .file("same-layer/x", b"6")
                .finish(),
        ),
        ("hl", Layer::new().hardlink("hl", "abs/secret").finish()),
        (
            "hl2",
            Layer::new().hardlink("hl2", "slash/etc/passwd").finish(),
        ),
        (
            "abs/.wh.secret",
            Layer::new().file("abs/.wh.secret", b"").finish(),
        ),
        (
            "abs/.wh..wh..opq",
            Layer::new().file("abs/.wh..wh..opq", b"").finish(),
        ),
    ] {
        results.push((
            name,
            apply_layer(&layer[..], &root, &Options::new(Whiteouts::Remove)).is_ok(),
        ));
    }
    // Nothing changed outside.
    assert_eq!(
        tree(&outside),
        expect(&[("secret", "f:host")]),
        "results: {results:?}"
    );
    assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    // What resolved inside the root landed there.
    assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"1");
    assert_eq!(fs::read(root.join("etc/shadow")).unwrap(), b"2");
    assert_eq!(fs::read(root.join("etc/group")).unwrap(), b"3");
    assert_eq!(
        fs::metadata(root.join("hl2")).unwrap().ino(),
        fs::metadata(root.join("etc/passwd")).unwrap().ino()
    );
    // `abs` and `same-layer` point at a path that does not exist inside the root.
    let ok: BTreeMap<_, _> = results.into_iter().collect();
    assert!(
        !ok["abs/pwned"] && !ok["same-layer/x"] && !ok["hl"],
        "{ok:?}"
    );
}

pub(crate) fn lower_tree() -> Vec<u8> {
    Layer::new()
        .dir("a/")
        .file("a/x", b"x")
        .file("a/y", b"y")
        .dir("b/")
        .file("b/z", b"z")
        .file("keep", b"k")
        .dir("o/")
        .file("o/old1", b"1")
        .dir("o/sub/")
        .file("o/sub/old2", b"2")
        .dir("p/")
        .file("p/old", b"3")
        .finish()
}

pub(crate) fn upper_tree() -> Vec<u8> {
    Layer::new()
        .file("a/.wh.x", b"")
        .file(".wh.b", b"")
        .file(".wh.missing", b"")
        .dir("o/")
        .file("o/new", b"n")
        .dir("o/sub/")
        .file("o/sub/new2", b"n2")
        // The opaque marker after the directory's new entries...
        .file("o/.wh..wh..opq", b"")
        .dir("p/")
        // ...and before them.
        .file("p/.wh..wh..opq", b"")
        .file("p/new", b"n3")
        // A whiteout of something the same layer adds hides nothing.
        .file("keep2", b"k2")
        .file(".wh.keep2", b"")
        .finish()
}

pub(crate) fn merged() -> BTreeMap<String, String> {
    expect(&[
        ("a", "d"),
        ("a/y", "f:y"),
        ("keep", "f:k"),
        ("keep2", "f:k2"),
        ("o", "d"),
        ("o/new", "f:n"),
        ("o/sub", "d"),
        ("o/sub/new2", "f:n2"),
        ("p", "d"),
        ("p/new", "f:n3"),
    ])
}

#[test]
fn whiteouts_remove_lower_paths() {
    let dir = tempfile::tempdir().unwrap();
    apply_layer(
        &lower_tree()[..],
        dir.path(),
        &Options::new(Whiteouts::Remove),
    )
    .unwrap();
    apply_layer(
        &upper_tree()[..],
        dir.path(),
        &Options::new(Whiteouts::Remove),
    )
    .unwrap();
    assert_eq!(tree(dir.path()), merged());
}

#[test]
fn overlay_whiteouts_give_the_same_merged_view() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (lower, upper, mnt) = (
        dir.path().join("l1"),
        dir.path().join("l2"),
        dir.path().join("mnt"),
    );
    for d in [&lower, &upper, &mnt] {
        fs::create_dir(d).unwrap();
    }
    apply_layer(&lower_tree()[..], &lower, &Options::new(Whiteouts::Overlay)).unwrap();
    apply_layer(&upper_tree()[..], &upper, &Options::new(Whiteouts::Overlay)).unwrap();

    let whiteout = fs::symlink_metadata(upper.join("a/x")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(
        fs::symlink_metadata(upper.join("missing"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(fs::symlink_metadata(upper.join("keep2")).unwrap().is_file());
    let mut buf = [0u8; 4];
    let n = rfs::lgetxattr(upper.join("o"), OVERLAY_OPAQUE_XATTR, &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"y");
    let n = rfs::lgetxattr(upper.join("p"), OVERLAY_OPAQUE_XATTR, &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"y");

    let options = format!("lowerdir={}:{}", upper.display(), lower.display());
    if let Err(e) = nix::mount::mount(
        Some("overlay"),
        &mnt,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    ) {
        eprintln!("skipped the overlay check: cannot mount overlayfs: {e}");
        return;
    }
    let view = tree(&mnt);
    nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(view, merged());
}

#[test]
fn truncated_layers_are_corrupt() {
    let tar = Layer::new()
        .file("big", &noise(300_000))
        .file("small", b"s")
        .finish();
    let gz = gzip(&tar);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let cases = [
        ("plain, inside file data", tar[..100_000].to_vec()),
        ("plain, inside a header", tar[..700].to_vec()),
        ("plain, inside padding", tar[..512 + 300_000 + 10].to_vec()),
        (
            "plain, inside the end blocks",
            tar[..tar.len() - 100].to_vec(),
        ),
        ("gzip, half", gz[..gz.len() / 2].to_vec()),
        ("gzip, no trailer", gz[..gz.len() - 4].to_vec()),
        ("zstd, half", zst[..zst.len() / 2].to_vec()),
        ("zstd, last bytes", zst[..zst.len() - 3].to_vec()),
    ];
    for (what, layer) in cases {
        let dir = tempfile::tempdir().unwrap();
        let result = apply_layer(&layer[..], dir.path(), &Options::new(Whiteouts::Remove));
        assert!(
            matches!(result, Err(UnpackError::Corrupt(_))),
            "{what}: {result:?}"
        );
    }
    let mut bad = gz.clone();
    let at = bad.len() - 6;
    bad[at] ^= 0xff; // the CRC
    let dir = tempfile::tempdir().unwrap();
    let result = apply_layer(&bad[..], dir.path(), &Options::new(Whiteouts::Remove));
    assert!(
        matches!(result, Err(UnpackError::Corrupt(_))),
        "crc: {result:?}"
    );
    // Not a tar at all.
    let result = apply_layer(
        &noise(4096)[..],
        dir.path(),
        &Options::new(Whiteouts::Remove),
    );
    assert!(
        matches!(result, Err(UnpackError::Corrupt(_))),
        "noise: {result:?}"
    );
}

#[test]
fn files_and_directories_replace_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let lower = Layer::new()
        .dir("d/")
        .file("d/f", b"old")
        .file("f", b"file")
        .symlink("l", "d")
        .finish();
    apply_layer(&lower[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap();
    let upper = Layer::new()
        .file("d", b"now a file")
        .dir("f/")
        .file("f/g", b"g")
        .dir("l/")
        // Twice in one layer: the last one wins.
        .file("twice", b"1")
        .file("twice", b"2")
        .finish();
    apply_layer(&upper[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap();
    assert_eq!(
        tree(dir.path()),
        expect(&[
            ("d", "f:now a file"),
            ("f", "d"),
            ("f/g", "f:g"),
            ("l", "d"),
            ("twice", "f:2"),
        ])
    );
}

#[test]
fn unknown_entry_types_are_unsupported() {
    let layer = Layer::new()
        .entry(EntryType::new(b'Z'), "weird", 0o644, b"", |_| {})
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let err = apply_layer(&layer[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap_err();
    assert!(
        matches!(&err, UnpackError::Unsupported { entry, .. } if entry == "weird"),
        "{err}"
    );
}

#[test]
fn long_names_and_pax_overrides_apply() {
    if !is_root() {
        return;
    }
    let long = format!("{}/file", "d".repeat(200));
    let long_target = format!("/{}", "t".repeat(300));
    let data = noise(1500);
    let layer = Layer::new()
        .with(|b| {
            // GNU long name (data) and long link (symlink target), as the builder writes them.
            let mut h = Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(3);
            b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Symlink);
            h.set_mode(0o777);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(0);
            b.append_link(&mut h, "long-link", &long_target).unwrap();
        })
        // PAX `size` over a header saying 0 (Go writes this for files over 8 GiB), and PAX
        // `path`, `uid`, `gid` over the header's.
        .pax(&[
            ("size", b"1500"),
            ("path", b"pax/named"),
            ("uid", b"5000000"),
            ("gid", b"6000000"),
        ])
        .entry(EntryType::Regular, "ustar-name", 0o600, &data, |h| {
            h.set_size(0)
        })
        .file("after", b"next header found")
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let applied = apply_layer(&layer[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap();
    assert_eq!(applied.node, None);
    let root = dir.path();
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"abc");
    assert_eq!(
        fs::read_link(root.join("long-link")).unwrap().to_str(),
        Some(long_target.as_str())
    );
    assert_eq!(fs::read(root.join("pax/named")).unwrap(), data);
    let meta = fs::metadata(root.join("pax/named")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (5_000_000, 6_000_000));
    assert!(!root.join("ustar-name").exists());
    assert_eq!(fs::read(root.join("after")).unwrap(), b"next header found");
}

#[test]
fn nodes_are_reported_or_refused() {
    if !is_root() {
        return;
    }
    let layer = Layer::new()
        .file("bin/app.wasm", b"\0asm")
        .entry(EntryType::Char, "dev/null", 0o666, b"", |h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        })
        .entry(EntryType::Fifo, "run/fifo", 0o600, b"", |_| {})
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let applied = apply_layer(&layer[..], dir.path(), &Options::new(Whiteouts::Remove)).unwrap();
    assert_eq!(
        applied.node,
        Some(("dev/null".to_owned(), "character device"))
    );
    for (what, layer) in [
        ("character device", layer),
        (
            "fifo",
            Layer::new()
                .entry(EntryType::Fifo, "run/fifo", 0o600, b"", |_| {})
                .finish(),
        ),
        (
            "block device",
            Layer::new()
                .entry(EntryType::Block, "dev/loop0", 0o600, b"", |h| {
                    h.set_device_major(7).unwrap();
                    h.set_device_minor(0).unwrap();
                })
                .finish(),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            nodes: Nodes::Refuse,
            ..Options::new(Whiteouts::Overlay)
        };
        let err = apply_layer(&layer[..], dir.path(), &opts).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Node { what: w, .. } if *w == what),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("wasm"), "{err}");
    }
    // Whiteouts are the unpacker's own nodes, not the layer's: still allowed.
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        nodes: Nodes::Refuse,
        ..Options::new(Whiteouts::Overlay)
    };
    let whiteout = Layer::new().file("etc/.wh.passwd", b"").finish();
    apply_layer(&whiteout[..], dir.path(), &opts).unwrap();
}

#[test]
fn pax_times_parse() {
    let t = |s| parse_pax_time(s).map(|t| (t.tv_sec, t.tv_nsec));
    assert_eq!(t("12"), Some((12, 0)));
    assert_eq!(t("12.5"), Some((12, 500_000_000)));
    assert_eq!(t("12.0000000019"), Some((12, 1)));
    assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
    assert_eq!(t("-3"), Some((-3, 0)));
    assert_eq!(t("x"), None);
    assert_eq!(t("1.x"), None);
    assert_eq!(t(""), None);
}
