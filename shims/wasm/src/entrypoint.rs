//! Which engine runs a container: the entrypoint file's header decides, per container, not the
//! runtime class. A Wasm pod under containerd's CRI has a sandbox (pause) container and may
//! have Linux sidecars; they reach this shim like its Wasm tasks do.
//!
//! The file is `process.args[0]`, found as `execvp` would find it (a name without `/` on the
//! process's `PATH`, else relative to its `cwd`), inside the rootfs only
//! (`yard_oci_runtime::inroot`: `..` and symlinks, absolute ones included, stop at the root, and
//! only a regular file is opened). Only its first [`PEEK`] bytes are read (the kernel's own `#!`
//! buffer).
//!
//! - `\0asm`: Wasm (a module or a component; `compile.rs` checks the rest).
//! - ELF, or a `#!` script whose interpreter is in the rootfs: a Linux container.
//! - Anything else, or a script whose interpreter is missing: Create fails, naming the file.
//!
//! The OCI Wasm artifact media types are not seen here: containerd's CRI passes the shim no
//! image manifest. switchyardd routes by them (`core/images`, `oci::is_for_wasm`), and an
//! artifact's layers are Wasm modules, which this header check then finds.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Process;
use yard_oci_runtime::inroot;
use yard_shim_kit::{Error, Result};

/// Bytes read from the entrypoint: the kernel's `BINPRM_BUF_SIZE`, the longest `#!` line it
/// honours.
pub const PEEK: usize = 256;
/// At most this many `PATH` entries are searched (the environment is the image's).
const MAX_PATH_DIRS: usize = 64;
/// `PATH` when the process sets none (runc's and libcontainer's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entrypoint {
    Wasm,
    Linux,
}

/// Which engine runs a container whose root is `rootfs`.
pub fn classify(rootfs: &Path, process: &Process) -> Result<Entrypoint> {
    let Some(arg0) = process.args().as_ref().and_then(|a| a.first()) else {
        return Err(Error::InvalidArgument(
            "config.json: process.args: empty (args[0] names a .wasm file or a Linux program)"
                .into(),
        ));
    };
    let what = format!("process.args[0] {arg0}");
    let root = inroot::open_root(rootfs)
        .map_err(Error::io(format!("open the rootfs {}", rootfs.display())))?;
    let cwd = process.cwd();
    let path_var = process
        .env()
        .iter()
        .flatten()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let file = find(&root, arg0, cwd, path_var, &what)?;
    let head = peek(&file, &what)?;
    match kind(&head) {
        Header::Wasm => Ok(Entrypoint::Wasm),
        Header::Elf => Ok(Entrypoint::Linux),
        Header::Script(interp) => {
            // A relative interpreter is the kernel's to resolve (against the cwd at exec).
            if interp.starts_with('/') {
                match inroot::find(&root, Path::new(&interp)) {
                    Ok(Some(f)) if inroot::is_file(&f) => {}
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "{what}: a #! script whose interpreter {interp} is not a file in the \
                             rootfs (and not a WebAssembly binary)"
                        )));
                    }
                }
            }
            Ok(Entrypoint::Linux)
        }
        Header::BadScript => Err(Error::InvalidArgument(format!(
            "{what}: a #! line that names no interpreter"
        ))),
        Header::Unknown => Err(Error::InvalidArgument(format!(
            "{what}: not a WebAssembly binary (no \\0asm header), nor an ELF executable or a #! \
             script"
        ))),
    }
}

/// The entrypoint as `execvp` would pick it: a regular file in the root, as an `O_PATH`
/// descriptor.
fn find(root: &OwnedFd, arg0: &str, cwd: &Path, path_var: &str, what: &str) -> Result<OwnedFd> {
    let cwd = if cwd.as_os_str().is_empty() {
        Path::new("/")
    } else {
        cwd
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if !arg0.contains('/') {
        candidates.extend(
            path_var
                .split(':')
                .filter(|d| !d.is_empty())
                .take(MAX_PATH_DIRS)
                .map(|d| Path::new(d).join(arg0)),
        );
    }
    candidates.push(cwd.join(arg0));
    let mut saw_other = false;
    for c in candidates {
        let c = clean(&c, cwd);
        let Some(f) = inroot::find(root, &c).map_err(|e| {
            Error::InvalidArgument(format!("{what}: cannot open it in the rootfs ({e})"))
        })?
        else {
            continue;
        };
        if inroot::is_file(&f) {
            return Ok(f);
        }
        saw_other = true;
    }
    Err(Error::InvalidArgument(if saw_other {
        format!("{what}: not a file")
    } else {
        format!("{what}: not found in the rootfs")
    }))
}

/// `path` as an absolute path inside the root, `..` stopping at `/` (relative to `cwd`).
fn clean(path: &Path, cwd: &Path) -> PathBuf {
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        cwd.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in full.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The first [`PEEK`] bytes of a regular file found by [`find`].
fn peek(fd: &OwnedFd, what: &str) -> Result<Vec<u8>> {
    inroot::read(fd, PEEK as u64)
        .map_err(|e| Error::InvalidArgument(format!("{what}: cannot read it ({e})")))
}

#[derive(Debug, PartialEq, Eq)]
enum Header {
    Wasm,
    Elf,
    /// `#!` and the interpreter's path.
    Script(String),
    BadScript,
    Unknown,
}

fn kind(head: &[u8]) -> Header {
    if head.starts_with(b"\0asm") {
        return Header::Wasm;
    }
    if head.starts_with(b"\x7fELF") {
        return Header::Elf;
    }
    let Some(rest) = head.strip_prefix(b"#!") else {
        return Header::Unknown;
    };
    let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
    let interp: Vec<u8> = line
        .iter()
        .copied()
        .skip_while(|b| *b == b' ' || *b == b'\t')
        .take_while(|b| !matches!(b, b' ' | b'\t' | b'\r' | 0))
        .collect();
    match String::from_utf8(interp) {
        Ok(s) if !s.is_empty() => Header::Script(s),
        _ => Header::BadScript,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(args: &[&str], cwd: &str, path: Option<&str>) -> Process {
        let mut env = Vec::new();
        if let Some(p) = path {
            env.push(format!("PATH={p}"));
        }
        let v = serde_json::json!({
            "args": args, "cwd": cwd, "env": env, "user": {"uid": 0, "gid": 0}
        });
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let r = dir.path();
        let w = |p: &str, b: &[u8]| {
            let p = r.join(p);
            std::fs::create_dir_all(p.parent().unwrap_or(r)).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(p, b).unwrap_or_else(|e| panic!("{e}"));
        };
        w("app/hello.wasm", b"\0asm\x01\0\0\0");
        w("bin/busybox", b"\x7fELF\x02\x01\x01");
        w("pause", b"\x7fELF\x02\x01\x01");
        w("run.sh", b"#!/bin/sh\necho hi\n");
        w("orphan.sh", b"#! /no/such/sh -e\necho hi\n");
        w("blank.sh", b"#!   \n");
        w("app.wasm", b"#!/bin/sh\necho not wasm\n");
        w("hello.txt", b"file contents\n");
        std::os::unix::fs::symlink("/bin/busybox", r.join("bin/sh"))
            .unwrap_or_else(|e| panic!("{e}"));
        // Absolute: resolved in the root, never on the host.
        std::os::unix::fs::symlink("/etc/passwd", r.join("escape"))
            .unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    fn classify_in(
        root: &Path,
        args: &[&str],
        cwd: &str,
    ) -> std::result::Result<Entrypoint, String> {
        classify(root, &process(args, cwd, None)).map_err(|e| e.to_string())
    }

    #[test]
    fn issue18_the_header_decides() {
        let dir = rootfs();
        let r = dir.path();
        assert_eq!(
            classify_in(r, &["/app/hello.wasm"], "/"),
            Ok(Entrypoint::Wasm)
        );
        assert_eq!(
            classify_in(r, &["hello.wasm"], "/app"),
            Ok(Entrypoint::Wasm)
        );
        assert_eq!(classify_in(r, &["/pause"], "/"), Ok(Entrypoint::Linux));
        // On PATH, through an absolute symlink that stays in the root.
        assert_eq!(
            classify_in(r, &["sh", "-c", "x"], "/"),
            Ok(Entrypoint::Linux)
        );
        assert_eq!(classify_in(r, &["/run.sh"], "/"), Ok(Entrypoint::Linux));
        let p = process(&["busybox"], "/", Some("/nowhere:/bin"));
        assert_eq!(classify(r, &p).ok(), Some(Entrypoint::Linux));
    }

    #[test]
    fn issue18_neither_wasm_nor_linux_names_the_file() {
        let dir = rootfs();
        let r = dir.path();
        // With /bin/sh it is a Linux script; alone in its image (as in the CRI test) it fails.
        assert_eq!(classify_in(r, &["/app.wasm"], "/"), Ok(Entrypoint::Linux));
        let alone = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(alone.path().join("app.wasm"), b"#!/bin/sh\necho not wasm\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let e = classify_in(alone.path(), &["/app.wasm"], "/")
            .err()
            .unwrap_or_default();
        assert!(
            e.starts_with("process.args[0] /app.wasm: a #! script whose interpreter /bin/sh"),
            "{e}"
        );
        let e = classify_in(r, &["/hello.txt"], "/")
            .err()
            .unwrap_or_default();
        assert!(
            e.starts_with("process.args[0] /hello.txt: not a WebAssembly binary"),
            "{e}"
        );
        let e = classify_in(r, &["/orphan.sh"], "/")
            .err()
            .unwrap_or_default();
        assert!(e.contains("interpreter /no/such/sh"), "{e}");
        let e = classify_in(r, &["/blank.sh"], "/")
            .err()
            .unwrap_or_default();
        assert!(e.ends_with("names no interpreter"), "{e}");
        let e = classify_in(r, &["/missing.wasm"], "/")
            .err()
            .unwrap_or_default();
        assert_eq!(e, "process.args[0] /missing.wasm: not found in the rootfs");
        let e = classify_in(r, &["/app"], "/").err().unwrap_or_default();
        assert_eq!(e, "process.args[0] /app: not a file");
        // A fifo is looked at, never opened: an open for reading would wait for a writer
        // (and a device's open may act).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.join("pipe.wasm"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = classify_in(r, &["/pipe.wasm"], "/")
            .err()
            .unwrap_or_default();
        assert_eq!(e, "process.args[0] /pipe.wasm: not a file");
        // The host's /etc/passwd is not reached.
        let e = classify_in(r, &["/escape"], "/").err().unwrap_or_default();
        assert!(e.ends_with("not found in the rootfs"), "{e}");
        let e = classify_in(r, &["/../../etc/passwd"], "/")
            .err()
            .unwrap_or_default();
        assert!(e.ends_with("not found in the rootfs"), "{e}");
        let e = classify_in(r, &[], "/").err().unwrap_or_default();
        assert!(e.starts_with("config.json: process.args: empty"), "{e}");
    }
}
