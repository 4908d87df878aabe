//! Boots the real guest (the Switchyard kernel and this agent's initramfs) under QEMU and drives
//! the agent over its virtio-serial port, as the vm shim does: Hello, containers from the
//! virtio-blk image and from a file in the 9p share, stdio (pipes, stdin, a terminal), exit
//! statuses, signals, exec, the cgroup calls, a malformed spec, and Shutdown ending QEMU.
//!
//! Needs root, `qemu-system-x86_64`, `mkfs.erofs`, busybox, the guest kernel and the initramfs;
//! skips with a printed reason otherwise (fails instead under `SWITCHYARD_REQUIRE_ALL=1`).
//!
//! - kernel: `YARD_GUEST_KERNEL`, else the cached build of `guest/kernel/build.sh` for the
//!   current config (this test never starts a kernel build), else
//!   `$SWITCHYARD_GUEST_DIR/vmlinux` (default `/var/lib/switchyard/guest`).
//! - initramfs: `YARD_AGENT_INITRD`, else built by `guest/agent/build-initrd.sh` into
//!   `<target dir>/yard-agent/initrd.cpio` (a release musl build of the agent: minutes when
//!   cold, seconds when nothing changed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    clippy::print_stdout
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_tests::{busybox_binary, busybox_tree, guest_dir, is_root, require, which};
use tokio::io::AsyncReadExt;
use yard_agent_protocol::ttrpc::{self, Code, r#async::transport::Socket};
use yard_agent_protocol::*;

/// Every agent call; TCG on a loaded 2-core machine is slow.
const CALL: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The kernel `guest/kernel/build.sh` would print, if it is built (same hash as the script).
fn cached_kernel() -> Option<PathBuf> {
    let script = r#"set -e
here=$1/guest/kernel
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null)
hash=$( { cat "$here/microvm.config" "$here/build.sh"; echo "$srcver"; } | sha256sum | cut -c1-16)
echo "${SWITCHYARD_KERNEL_CACHE:-/var/cache/switchyard/kernel}/$hash/vmlinux""#;
    let out = Command::new("bash")
        .args(["-c", script, "bash"])
        .arg(repo())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

fn kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("YARD_GUEST_KERNEL") {
        return Some(PathBuf::from(k)).filter(|p| p.is_file());
    }
    cached_kernel().or_else(|| Some(guest_dir().join("vmlinux")).filter(|p| p.is_file()))
}

fn initrd() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("YARD_AGENT_INITRD") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("YARD_AGENT_INITRD={} does not exist", p.display()))
        };
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let out = target.join("yard-agent/initrd.cpio");
    let status = Command::new(repo().join("guest/agent/build-initrd.sh"))
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("run build-initrd.sh: {e}"))?;
    if status.success() {
        Ok(out)
    } else {
        Err(format!("build-initrd.sh failed ({status})"))
    }
}

/// A busybox rootfs with a marker file, as an erofs image.
fn erofs_image(dir: &Path, name: &str, marker: &str) -> PathBuf {
    let root = dir.join(format!("{name}.d"));
    busybox_tree(&root);
    std::fs::write(root.join("etc/marker"), marker).unwrap();
    let image = dir.join(format!("{name}.erofs"));
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&image)
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.erofs: {out:?}");
    image
}

/// QEMU running the guest; killed (and waited for) on drop, with its console printed if the
/// test failed.
struct Vm {
    child: Child,
    console: PathBuf,
    sock: PathBuf,
    started: Instant,
    greeted: bool,
    connection: Option<std::os::unix::net::UnixStream>,
}

impl Vm {
    /// Boots a guest; `extra` is appended to the kernel command line.
    fn boot(
        kernel: &Path,
        initrd: &Path,
        disk: &Path,
        share: &Path,
        dir: &Path,
        extra: &str,
    ) -> Vm {
        let sock = dir.join("agent.sock");
        let console = dir.join("console.log");
        let child = Command::new("qemu-system-x86_64")
            // No ACPI in the guest kernel: with acpi=off QEMU puts the virtio-mmio devices on
            // the kernel command line.
            .args([
                "-M",
                "microvm,acpi=off",
                "-accel",
                "tcg",
                "-smp",
                "2",
                "-m",
                "256",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 reboot=t yard.debug=1 {extra}"
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["-device", "virtio-serial-device"])
            .args(["-device", "virtserialport,chardev=agent,name=yard.agent"])
            .arg("-drive")
            .arg(format!(
                "id=root,file={},format=raw,if=none,readonly=on",
                disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .arg("-fsdev")
            .arg(format!(
                "local,id=share,path={},security_model=none,readonly=on",
                share.display()
            ))
            .args([
                "-device",
                "virtio-9p-device,fsdev=share,mount_tag=yardshare",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm {
            child,
            console,
            sock,
            started: Instant::now(),
            greeted: false,
            connection: None,
        }
    }

    /// Connects to the agent's port, reads the banner, and returns the ttrpc client.
    ///
    /// A virtio-serial port only tells the guest "host connected" or not: when a host closes
    /// its socket and connects again before the guest has looked, the agent sees no change and
    /// sends no new banner. So a host that reconnects waits briefly for the banner, and if none
    /// comes, stays away a moment (the agent then sees the port closed and reopens it) and tries
    /// again. The first connection (the agent is booting) waits long.
    async fn connect(&mut self) -> AgentClient {
        let first = !self.greeted;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut stream = self.connect_socket().await;
            // Dropping a ttrpc client does not close its socket: keep a handle that can.
            let std_stream = stream.into_std().unwrap();
            self.connection = Some(std_stream.try_clone().unwrap());
            stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
            let wait = if first {
                Duration::from_secs(120)
            } else {
                Duration::from_secs(2)
            };
            let mut banner = vec![0u8; READY_BANNER.len()];
            match tokio::time::timeout(wait, stream.read_exact(&mut banner)).await {
                Ok(read) => {
                    read.expect("read the banner");
                    assert_eq!(banner, READY_BANNER);
                }
                Err(_) if !first && attempt < 10 => {
                    self.disconnect();
                    drop(stream);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(_) => panic!("no READY banner in {wait:?} (attempt {attempt})"),
            }
            if first {
                self.greeted = true;
                println!(
                    "boot to banner: {} ms (QEMU start to banner, TCG)",
                    self.started.elapsed().as_millis()
                );
            } else {
                println!("reconnected (attempt {attempt})");
            }
            return AgentClient::new(ttrpc::r#async::Client::new(Socket::new(stream)));
        }
    }

    async fn connect_socket(&mut self) -> tokio::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::net::UnixStream::connect(&self.sock).await {
                Ok(s) => return s,
                Err(e) => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!("QEMU exited ({status}) before the agent port was there");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "connect {}: {e}",
                        self.sock.display()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Closes the connection, as a host that goes away does.
    fn disconnect(&mut self) {
        if let Some(c) = self.connection.take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits for QEMU to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.console).unwrap_or_default();
            eprintln!("--- guest console ---\n{log}\n--- end of guest console ---");
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

async fn call<T>(what: &str, f: impl std::future::Future<Output = ttrpc::Result<T>>) -> T {
    match tokio::time::timeout(CALL, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e:?}"),
        Err(_) => panic!("{what}: no answer in {CALL:?}"),
    }
}

async fn call_err<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> (Code, String) {
    match tokio::time::timeout(CALL, f).await {
        Ok(Err(ttrpc::Error::RpcStatus(s))) => (s.code.enum_value_or_default(), s.message),
        Ok(other) => panic!("{what}: expected an error status, got {other:?}"),
        Err(_) => panic!("{what}: no answer in {CALL:?}"),
    }
}

/// A spec like runc's default (`runc spec`), running `args`.
fn spec(args: &[&str], terminal: bool, cgroups_path: Option<&str>) -> Vec<u8> {
    let caps = json!([
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_CHOWN",
        "CAP_SETUID",
        "CAP_SETGID"
    ]);
    let mut linux = json!({
        "resources": {"devices": [{"allow": false, "access": "rwm"}]},
        "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                        "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    });
    if let Some(p) = cgroups_path {
        linux["cgroupsPath"] = json!(p);
    }
    let v = json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "yard",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": linux
    });
    serde_json::to_vec(&v).unwrap()
}

fn vda() -> Storage {
    Storage {
        block_device: "/dev/vda".into(),
        fstype: "erofs".into(),
        ..Default::default()
    }
}

fn preq(id: &str, exec_id: &str) -> ProcessRequest {
    ProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

fn creq(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

async fn create(
    c: &AgentClient,
    id: &str,
    spec: Vec<u8>,
    storage: Storage,
    stdin: bool,
) -> ttrpc::Result<Empty> {
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec,
        storage: Some(storage).into(),
        stdin,
        ..Default::default()
    };
    c.create_container(ctx(), &req).await
}

async fn start(c: &AgentClient, id: &str, exec_id: &str) -> u32 {
    call(
        &format!("StartProcess {id}/{exec_id}"),
        c.start_process(ctx(), &preq(id, exec_id)),
    )
    .await
    .pid
}

/// Reads a stream to end-of-file.
async fn read_all(c: &AgentClient, id: &str, exec_id: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let req = ReadRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            len: 4096,
            ..Default::default()
        };
        let what = format!("read {id}/{exec_id} stderr={stderr}");
        let r = if stderr {
            call(&what, c.read_stderr(ctx(), &req)).await
        } else {
            call(&what, c.read_stdout(ctx(), &req)).await
        };
        out.extend_from_slice(&r.data);
        if r.eof {
            return String::from_utf8_lossy(&out).into_owned();
        }
    }
}

async fn wait(c: &AgentClient, id: &str, exec_id: &str) -> u32 {
    call(
        &format!("WaitProcess {id}/{exec_id}"),
        c.wait_process(ctx(), &preq(id, exec_id)),
    )
    .await
    .status
}

async fn remove(c: &AgentClient, id: &str) {
    call(
        &format!("RemoveContainer {id}"),
        c.remove_container(ctx(), &creq(id)),
    )
    .await;
}

/// Runs a container to completion: (stdout, stderr, status).
async fn run(c: &AgentClient, id: &str, args: &[&str], storage: Storage) -> (String, String, u32) {
    call(
        &format!("CreateContainer {id}"),
        create(c, id, spec(args, false, None), storage, false),
    )
    .await;
    start(c, id, "").await;
    let (out, err) = tokio::join!(read_all(c, id, "", false), read_all(c, id, "", true));
    let status = wait(c, id, "").await;
    remove(c, id).await;
    (out, err, status)
}

#[test]
fn the_agent_runs_containers_in_a_real_guest() {
    if !require(
        is_root(),
        "needs root (QEMU's 9p share of root-owned images)",
    ) {
        return;
    }
    for p in ["qemu-system-x86_64", "mkfs.erofs"] {
        if !require(which(p).is_some(), &format!("needs {p} on PATH")) {
            return;
        }
    }
    if !require(
        busybox_binary().is_some(),
        "needs busybox (apt-get install busybox-static)",
    ) {
        return;
    }
    let Some(kernel) = kernel() else {
        require(
            false,
            "no guest kernel (run guest/kernel/build.sh, or set YARD_GUEST_KERNEL)",
        );
        return;
    };
    let initrd = match initrd() {
        Ok(p) => p,
        Err(e) => {
            require(false, &format!("no agent initramfs: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = erofs_image(dir.path(), "first", "from the disk\n");
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("images")).unwrap();
    erofs_image(&share.join("images"), "second", "from the share\n");
    let mut vm = Vm::boot(&kernel, &initrd, &disk, &share, dir.path(), "");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = vm.connect().await;
        scenarios(&c).await;

        // The host goes away and comes back (a shim restart): the agent reopens its port and
        // greets the new connection with the banner.
        drop(c);
        vm.disconnect();
        let c = vm.connect().await;
        call("Hello again", c.hello(ctx(), &HelloRequest::default())).await;
        call("Shutdown", c.shutdown(ctx(), &Empty::default())).await;
    });
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "QEMU still runs 30s after Shutdown"
    );
    let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
    assert!(
        !console.contains(NO_ZYGOTE),
        "the runtime zygote did not start:\n{console}"
    );
    drop(vm);

    // Without the zygote (`yard.zygote=0`, the way the agent goes when it is gone), runtime
    // mode runs by executing the agent: containers run and fail the same.
    let dir = tempfile::tempdir().unwrap();
    let disk = erofs_image(dir.path(), "first", "from the disk\n");
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("images")).unwrap();
    let mut vm = Vm::boot(&kernel, &initrd, &disk, &share, dir.path(), "yard.zygote=0");
    rt.block_on(async {
        let c = vm.connect().await;
        let (out, _, status) = run(&c, "exec1", &["/bin/cat", "/etc/marker"], vda()).await;
        assert_eq!((out.as_str(), status), ("from the disk\n", 0));
        let (_, _, status) = run(&c, "exec2", &["/bin/sh", "-c", "exit 3"], vda()).await;
        assert_eq!(status, 3);
        call("Shutdown", c.shutdown(ctx(), &Empty::default())).await;
    });
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "QEMU still runs 30s after Shutdown"
    );
    let console = std::fs::read_to_string(&vm.console).unwrap_or_default();
    assert!(console.contains(NO_ZYGOTE), "{console}");
}

/// What the agent logs when it runs without its runtime zygote.
const NO_ZYGOTE: &str = "no runtime zygote";

/// Prints how long each part took.
struct Lap(Instant);

impl Lap {
    fn mark(&mut self, what: &str) {
        println!("  {what}: {} ms", self.0.elapsed().as_millis());
        self.0 = Instant::now();
    }
}

async fn scenarios(c: &AgentClient) {
    let t = Instant::now();
    let mut lap = Lap(t);
    let hello = call("Hello", c.hello(ctx(), &HelloRequest::default())).await;
    assert!(
        hello.kernel_release.starts_with("6.1."),
        "kernel {}",
        hello.kernel_release
    );
    assert_eq!(hello.vcpus, 2);
    assert!(
        (200 << 20..=256 << 20).contains(&hello.memory_bytes),
        "memory {}",
        hello.memory_bytes
    );
    println!("hello: {hello:?}");

    // The container sees the guest: its kernel, its vcpus.
    let (out, err, status) = run(c, "uname", &["/bin/uname", "-r"], vda()).await;
    assert!(
        out.starts_with("6.1."),
        "uname -r: {out:?} (stderr {err:?})"
    );
    assert_eq!(status, 0, "stderr {err:?}");
    // ... and its own network namespace has lo, up (flags IFF_UP | IFF_LOOPBACK).
    let (out, err, status) = run(
        c,
        "facts",
        &[
            "/bin/sh",
            "-c",
            "grep -c ^processor /proc/cpuinfo; ls /sys/class/net; cat /sys/class/net/lo/flags",
        ],
        vda(),
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(status, 0, "stderr {err:?}");
    assert_eq!(lines.first(), Some(&"2"), "{out:?}");
    assert!(lines.contains(&"lo"), "{out:?}");
    assert_eq!(lines.last(), Some(&"0x9"), "{out:?}");

    lap.mark("uname and cpuinfo");

    // Both streams and the exit code.
    let (out, err, status) = run(
        c,
        "streams",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        vda(),
    )
    .await;
    assert_eq!((out.as_str(), err.as_str(), status), ("out\n", "err\n", 3));

    lap.mark("both streams");

    // stdin through cat.
    call(
        "CreateContainer cat",
        create(c, "cat", spec(&["/bin/cat"], false, None), vda(), true),
    )
    .await;
    start(c, "cat", "").await;
    let write = WriteRequest {
        container_id: "cat".into(),
        data: b"hello through stdin\n".to_vec(),
        ..Default::default()
    };
    let n = call("WriteStdin", c.write_stdin(ctx(), &write)).await.len;
    assert_eq!(n as usize, write.data.len());
    call("CloseStdin", c.close_stdin(ctx(), &preq("cat", ""))).await;
    assert_eq!(read_all(c, "cat", "", false).await, "hello through stdin\n");
    assert_eq!(wait(c, "cat", "").await, 0);
    remove(c, "cat").await;

    lap.mark("stdin");

    // A long-running container: exec, terminal exec, cgroup calls, SIGKILL.
    call(
        "CreateContainer sleeper",
        create(
            c,
            "sleeper",
            spec(&["sleep", "100"], false, Some("/switchyard/test/sleeper")),
            vda(),
            false,
        ),
    )
    .await;
    let pid = start(c, "sleeper", "").await;
    assert!(pid > 1);
    let (code, _) = call_err(
        "StartProcess twice",
        c.start_process(ctx(), &preq("sleeper", "")),
    )
    .await;
    assert_eq!(code, Code::FAILED_PRECONDITION);

    let exec = ExecProcessRequest {
        container_id: "sleeper".into(),
        exec_id: "echo".into(),
        process: serde_json::to_vec(&json!({
            "args": ["/bin/echo", "hi"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin"]
        }))
        .unwrap(),
        ..Default::default()
    };
    call("ExecProcess echo", c.exec_process(ctx(), &exec)).await;
    start(c, "sleeper", "echo").await;
    assert_eq!(read_all(c, "sleeper", "echo", false).await, "hi\n");
    assert_eq!(wait(c, "sleeper", "echo").await, 0);

    // Issue 16: an exec whose process names no capabilities and no noNewPrivileges is confined
    // as the container's init (runc's rule), not left with root's full set; and it is in init's
    // cgroup and namespaces.
    let views = "cat /proc/self/status; echo ===; cat /proc/1/status; echo ===; \
        cat /proc/self/cgroup; for n in cgroup ipc mnt net pid uts; do readlink /proc/self/ns/$n; done; \
        echo ===; cat /proc/1/cgroup; for n in cgroup ipc mnt net pid uts; do readlink /proc/1/ns/$n; done";
    let exec = ExecProcessRequest {
        container_id: "sleeper".into(),
        exec_id: "confined".into(),
        process: serde_json::to_vec(&json!({
            "args": ["/bin/sh", "-c", views], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin"]
        }))
        .unwrap(),
        ..Default::default()
    };
    call("ExecProcess confined", c.exec_process(ctx(), &exec)).await;
    start(c, "sleeper", "confined").await;
    let out = read_all(c, "sleeper", "confined", false).await;
    assert_eq!(wait(c, "sleeper", "confined").await, 0, "{out}");
    let parts: Vec<&str> = out.split("===\n").collect();
    assert_eq!(parts.len(), 4, "{out}");
    let confinement = |status: &str| -> Vec<String> {
        status
            .lines()
            .filter(|l| {
                [
                    "NoNewPrivs:",
                    "CapInh:",
                    "CapPrm:",
                    "CapEff:",
                    "CapBnd:",
                    "CapAmb:",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(confinement(parts[1]).len(), 6, "{out}");
    assert_eq!(
        confinement(parts[0]),
        confinement(parts[1]),
        "exec and init differ: {out}"
    );
    assert_eq!(parts[2], parts[3], "exec and init differ: {out}");

    // The exec shares the container's pid namespace: it sees sleep as pid 1.
    let exec = ExecProcessRequest {
        container_id: "sleeper".into(),
        exec_id: "tty".into(),
        process: serde_json::to_vec(&json!({
            "terminal": true,
            "args": ["/bin/sh", "-c", "read x; stty size; echo tty=$(tty) x=$x; cat /proc/1/cmdline"],
            "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin", "TERM=xterm"]
        }))
        .unwrap(),
        ..Default::default()
    };
    call("ExecProcess tty", c.exec_process(ctx(), &exec)).await;
    start(c, "sleeper", "tty").await;
    let resize = ResizeRequest {
        container_id: "sleeper".into(),
        exec_id: "tty".into(),
        width: 100,
        height: 40,
        ..Default::default()
    };
    call("ResizePty", c.resize_pty(ctx(), &resize)).await;
    let write = WriteRequest {
        container_id: "sleeper".into(),
        exec_id: "tty".into(),
        data: b"go\n".to_vec(),
        ..Default::default()
    };
    call("WriteStdin tty", c.write_stdin(ctx(), &write)).await;
    let out = read_all(c, "sleeper", "tty", false).await;
    assert!(out.contains("40 100"), "terminal output {out:?}");
    assert!(out.contains("tty=/dev/pts/"), "terminal output {out:?}");
    assert!(out.contains("x=go"), "terminal output {out:?}");
    assert!(out.contains("sleep"), "terminal output {out:?}");
    assert_eq!(read_all(c, "sleeper", "tty", true).await, "");
    assert_eq!(wait(c, "sleeper", "tty").await, 0);

    let pids = call("ListPids", c.list_pids(ctx(), &creq("sleeper"))).await;
    assert!(pids.pids.contains(&pid), "{:?} lacks {pid}", pids.pids);
    let update = UpdateRequest {
        container_id: "sleeper".into(),
        resources: br#"{"pids":{"limit":100},"memory":{"limit":67108864}}"#.to_vec(),
        ..Default::default()
    };
    call("UpdateContainer", c.update_container(ctx(), &update)).await;
    let stats = call("Stats", c.stats(ctx(), &creq("sleeper"))).await;
    assert_eq!(stats.pids_limit, 100, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, 64 << 20, "{stats:?}");
    assert!(
        stats.pids_current >= 1 && stats.memory_usage_bytes > 0,
        "{stats:?}"
    );
    let bad = UpdateRequest {
        container_id: "sleeper".into(),
        resources: br#"{"pids":{"limit":"many"}}"#.to_vec(),
        ..Default::default()
    };
    let (code, msg) = call_err("UpdateContainer bad", c.update_container(ctx(), &bad)).await;
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("resources.pids.limit"), "{msg}");
    call("Pause", c.pause_container(ctx(), &creq("sleeper"))).await;
    call("Resume", c.resume_container(ctx(), &creq("sleeper"))).await;

    let kill = SignalRequest {
        container_id: "sleeper".into(),
        signal: 9,
        ..Default::default()
    };
    call("SignalProcess KILL", c.signal_process(ctx(), &kill)).await;
    assert_eq!(wait(c, "sleeper", "").await, 137);
    assert_eq!(read_all(c, "sleeper", "", false).await, "");
    remove(c, "sleeper").await;
    let (code, _) = call_err("Stats after remove", c.stats(ctx(), &creq("sleeper"))).await;
    assert_eq!(code, Code::NOT_FOUND);

    lap.mark("exec, terminal exec, cgroup calls, SIGKILL");

    // A terminal init.
    call(
        "CreateContainer term",
        create(
            c,
            "term",
            spec(&["/bin/sh", "-c", "echo term=$(tty)"], true, None),
            vda(),
            false,
        ),
    )
    .await;
    start(c, "term", "").await;
    let out = read_all(c, "term", "", false).await;
    assert!(out.contains("term=/dev/"), "terminal init output {out:?}");
    assert_eq!(wait(c, "term", "").await, 0);
    remove(c, "term").await;

    lap.mark("terminal init");

    // Bad input is refused with a status naming the field.
    let mut bad = serde_json::from_slice::<Value>(&spec(&["/bin/true"], false, None)).unwrap();
    bad["process"]["args"] = json!("not-a-list");
    let (code, msg) = call_err(
        "CreateContainer malformed",
        create(c, "bad", serde_json::to_vec(&bad).unwrap(), vda(), false),
    )
    .await;
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("process.args"), "{msg}");
    let (code, msg) = call_err(
        "CreateContainer bad storage",
        create(
            c,
            "bad",
            spec(&["/bin/true"], false, None),
            Storage {
                block_device: "/dev/vda".into(),
                fstype: "xfs".into(),
                ..Default::default()
            },
            false,
        ),
    )
    .await;
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("storage.fstype"), "{msg}");
    let (code, _) = call_err(
        "WaitProcess unknown",
        c.wait_process(ctx(), &preq("nope", "")),
    )
    .await;
    assert_eq!(code, Code::NOT_FOUND);

    lap.mark("bad input");

    // A second image, from the 9p share (loop-mounted), beside a container from the disk.
    call(
        "CreateContainer disk",
        create(
            c,
            "disk",
            spec(&["sleep", "100"], false, None),
            vda(),
            false,
        ),
    )
    .await;
    let (out, err, status) = run(
        c,
        "shared",
        &["cat", "/etc/marker"],
        Storage {
            shared_file: "images/second.erofs".into(),
            fstype: "erofs".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (out.as_str(), status),
        ("from the share\n", 0),
        "stderr {err:?}"
    );
    let (code, _) = call_err(
        "CreateContainer twice",
        create(c, "disk", spec(&["true"], false, None), vda(), false),
    )
    .await;
    assert_eq!(code, Code::ALREADY_EXISTS);

    lap.mark("9p share");

    // An OOM kill in a container with a memory limit is reported.
    // Already waiting when the container is created: a long poll beside other calls.
    let oom_wait = {
        let c = c.clone();
        tokio::spawn(async move { c.wait_oom(ctx(), &Empty::default()).await })
    };
    let mut oom_spec = serde_json::from_slice::<Value>(&spec(
        // tmpfs pages are charged to the writer's cgroup; without swap they cannot be reclaimed.
        &[
            "/bin/dd",
            "if=/dev/zero",
            "of=/dev/shm/fill",
            "bs=1M",
            "count=48",
        ],
        false,
        None,
    ))
    .unwrap();
    oom_spec["linux"]["resources"]["memory"] = json!({"limit": 16 << 20});
    call(
        "CreateContainer oom",
        create(
            c,
            "oom",
            serde_json::to_vec(&oom_spec).unwrap(),
            vda(),
            false,
        ),
    )
    .await;
    start(c, "oom", "").await;
    let event = call("WaitOom", async { oom_wait.await.unwrap() }).await;
    assert_eq!(event.container_id, "oom");
    let stats = call("Stats oom", c.stats(ctx(), &creq("oom"))).await;
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, 16 << 20);
    let status = wait(c, "oom", "").await;
    assert_eq!(status, 137, "dd was OOM-killed");
    remove(c, "oom").await;

    lap.mark("OOM");
    println!("scenarios: {} ms", t.elapsed().as_millis());
    // "disk" is left created (never started): Shutdown kills what is left.
}
