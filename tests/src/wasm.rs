//! The Wasm test programs ("fixtures") in `tests/wasm`, a standalone cargo workspace built
//! on demand for `wasm32-wasip1` and `wasm32-wasip2` into `<repo>/target/wasm-fixtures`.
//!
//! - `hello` (wasip1: a core module; wasip2: a component exporting `wasi:cli/run`) prints
//!   `hello from wasm`, its arguments and environment, then runs its options (`--read`,
//!   `--write`, `--stderr`, `--stdin`, `--sleep`, `--loop`, `--alloc-mb`, `--trap`, `--exit`;
//!   see `tests/wasm/hello/src/main.rs`).
//! - `http` (wasip2): a `wasi:http/incoming-handler` component answering every request with
//!   200 `hello from wasm http: <METHOD> <PATH>`, or the sorted environment for `/env`.
//! - `sockets` (wasip2): a command using `wasi:sockets` through `std::net` (`--read ADDR`,
//!   `--hold N ADDR`, `--udp-loop TEXT`; see `tests/wasm/sockets/src/main.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The built fixtures.
#[derive(Debug)]
pub struct Fixtures {
    /// `hello` for `wasm32-wasip1`: a core Wasm module.
    pub hello_module: PathBuf,
    /// `hello` for `wasm32-wasip2`: a component exporting `wasi:cli/run`.
    pub hello_component: PathBuf,
    /// `http` for `wasm32-wasip2`: a component exporting `wasi:http/incoming-handler`.
    pub http_component: PathBuf,
    /// `sockets` for `wasm32-wasip2`: a command using `wasi:sockets` through `std::net`.
    pub sockets_component: PathBuf,
}

/// Builds `tests/wasm` once per process (`cargo build --release --locked` for `wasm32-wasip1`
/// and `wasm32-wasip2`, into `<repo>/target/wasm-fixtures`) and returns the `.wasm` paths.
///
/// Panics with the failing command and its stderr if the build fails.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(build)
}

/// The worker of the Wasm shim whose first task is `id` (a shim's worker is named after the
/// task that started the shim): the process whose command line is
/// `containerd-shim-yard-wasm-v1 worker ... -id ID`.
pub fn worker_of(id: &str) -> Option<u32> {
    crate::host::processes_matching(&["containerd-shim-yard-wasm-v1 worker "])
        .into_iter()
        .find(|(_, cmd)| cmd.split(' ').skip_while(|a| *a != "-id").nth(1) == Some(id))
        .map(|(p, _)| p)
}

/// Whether process `pid` (a worker) is in the cgroup of task `id`, in any hierarchy: a cgroup
/// named after the task, as `yard` and `ctr` name it (`…/ID`).
pub fn in_cgroup_of(pid: u32, id: &str) -> bool {
    let suffix = format!("/{id}");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.ends_with(&suffix))
}

/// Whether `bytes` start like a Wasm component (rather than a core module): the `\0asm` magic,
/// then the component version and layer.
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", env!("CARGO_MANIFEST_DIR")))
}

fn build() -> Fixtures {
    let root = repo_root();
    let manifest = root.join("tests/wasm/Cargo.toml");
    let target_dir = root.join("target/wasm-fixtures");

    cargo_build(&manifest, &target_dir, "wasm32-wasip1", &["hello"]);
    cargo_build(
        &manifest,
        &target_dir,
        "wasm32-wasip2",
        &["hello", "http", "sockets"],
    );

    let fixtures = Fixtures {
        hello_module: target_dir.join("wasm32-wasip1/release/hello.wasm"),
        hello_component: target_dir.join("wasm32-wasip2/release/hello.wasm"),
        http_component: target_dir.join("wasm32-wasip2/release/http.wasm"),
        sockets_component: target_dir.join("wasm32-wasip2/release/sockets.wasm"),
    };
    check(&fixtures.hello_module, false);
    check(&fixtures.hello_component, true);
    check(&fixtures.http_component, true);
    check(&fixtures.sockets_component, true);
    fixtures
}

fn cargo_build(manifest: &Path, target_dir: &Path, target: &str, packages: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target")
        .arg(target)
        .arg("--target-dir")
        .arg(target_dir);
    for p in packages {
        cmd.arg("-p").arg(p);
    }
    cmd.env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    if let Some(dir) = manifest.parent() {
        cmd.current_dir(dir);
    }

    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("building the Wasm fixtures: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "building the Wasm fixtures failed ({}): {cmd:?}\n\
             (the targets need `rustup target add wasm32-wasip1 wasm32-wasip2`)\n\
             stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn check(path: &Path, component: bool) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "Wasm fixture {} is missing after the build: {e}",
            path.display()
        )
    });
    let kind = if component {
        "component"
    } else {
        "core module"
    };
    assert!(
        bytes.starts_with(b"\0asm") && is_component(&bytes) == component,
        "Wasm fixture {} is not a {kind}",
        path.display()
    );
}

/// A root filesystem for Wasm tasks, made once per test process: `/app/hello.wasm` (module),
/// `/app/hello-c.wasm` (component), `/app/http.wasm` (wasi:http component), `/app/bad.wasm`
/// (not Wasm), `/hello.txt` (`file contents`) and an empty `/data` directory.
pub fn wasm_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let f = fixtures();
        // Named by the modules it holds: every test process shares one tree rather than
        // leaving one each behind (the way `busybox_rootfs` is versioned).
        let modules = [&f.hello_module, &f.hello_component, &f.http_component];
        let all: Vec<u8> = modules
            .iter()
            .flat_map(|m| std::fs::read(m).unwrap_or_else(|e| panic!("{}: {e}", m.display())))
            .collect();
        let digest = crate::images::sha256_hex(&all);
        let done = std::env::temp_dir().join(format!("switchyard-wasm-{}", &digest[..16]));
        if done.join("hello.txt").is_file() {
            return done;
        }
        let dir = done.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let app = dir.join("app");
        std::fs::create_dir_all(&app)
            .and_then(|()| std::fs::create_dir_all(dir.join("data")))
            .and_then(|()| std::fs::copy(&f.hello_module, app.join("hello.wasm")).map(drop))
            .and_then(|()| std::fs::copy(&f.hello_component, app.join("hello-c.wasm")).map(drop))
            .and_then(|()| std::fs::copy(&f.http_component, app.join("http.wasm")).map(drop))
            .and_then(|()| std::fs::write(app.join("bad.wasm"), b"\0asm\x01\0\0\0garbage"))
            .and_then(|()| std::fs::write(dir.join("hello.txt"), b"file contents\n"))
            .unwrap_or_else(|e| panic!("make the wasm rootfs {}: {e}", dir.display()));
        // hello.txt is written last: a tree that has it is whole.
        if std::fs::rename(&dir, &done).is_err() {
            // Another process made it first.
            let _ = std::fs::remove_dir_all(&dir);
        }
        done
    })
}

#[cfg(test)]
mod tests {
    use super::is_component;

    #[test]
    fn component_header() {
        let component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00, 0x07];
        let module = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
        assert!(is_component(&component));
        assert!(is_component(&component[..8]));
        assert!(!is_component(&module));
        assert!(!is_component(&component[..7]));
        assert!(!is_component(b""));
        assert!(!is_component(b"\x7fELF\x0d\x00\x01\x00"));
    }
}
