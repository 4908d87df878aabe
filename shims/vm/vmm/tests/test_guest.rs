//! Boots the `no_std` test guest (`shims/vm/vmm/test-guest`, built here on demand) through the
//! VMM's public API and checks every device from the host side: the console lines, the sector
//! the guest wrote through virtio-blk, both hybrid-vsock streams (guest → host port 1234, and
//! host → guest port 5000 through `CONNECT 5000`), the boot timer and the i8042 reset.
//!
//! The guest drives the devices with the `virtio-drivers` crate in polling mode, so this proves
//! the device models against a driver nobody here wrote. Needs root and `/dev/kvm`.

#![allow(clippy::print_stderr, clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::fmt::Display;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Console, have_kvm};
use yard_vmm::vmm::{BlockConfig, Vm, VmExit, VmmConfig, VsockConfig};

const SECTOR: usize = 512;
/// What the test puts in sector 0; the guest sends its first line back over vsock.
const DISK_LINE: &str = "switchyard test disk";
const GUEST_CID: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

/// The guest's ELF, built once per process (`cargo build --release --locked` for
/// `x86_64-unknown-none` into `<repo>/target/test-guest`).
fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(build_guest)
}

fn build_guest() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guest_dir = crate_dir.join("test-guest");
    let repo = crate_dir
        .ancestors()
        .nth(3)
        .expect("shims/vm/vmm is three levels below the repository");
    let target_dir = repo.join("target/test-guest");
    let target = "x86_64-unknown-none";

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target", target])
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // The guest's `.cargo/config.toml` (a static, non-PIE executable) is found from the
        // working directory, and RUSTFLAGS from the environment would replace it.
        .current_dir(&guest_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("building the test guest: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "building the test guest failed ({}): {cmd:?}\n\
         (the target needs `rustup target add {target}`)\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let elf = target_dir.join(target).join("release/test-guest");
    let bytes = std::fs::read(&elf)
        .unwrap_or_else(|e| panic!("test guest {} missing after the build: {e}", elf.display()));
    // A static executable (ET_EXEC), not a PIE nobody would relocate.
    assert!(
        bytes.starts_with(b"\x7fELF") && bytes.get(16..18) == Some(&[2u8, 0][..]),
        "{} is not a static x86_64 executable",
        elf.display()
    );
    elf
}

/// The VMM's `tracing` events (debug and up), kept for failure reports. yard-vmm has no
/// subscriber dependency, and this one is all a test needs.
struct Logs;

static LOG_LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl Logs {
    fn install() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            // Another global subscriber (none in this test binary) would keep its own.
            let _ = tracing::subscriber::set_global_default(Logs);
        });
    }

    fn text() -> String {
        LOG_LINES.lock().unwrap().join("\n")
    }
}

impl tracing::Subscriber for Logs {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::DEBUG
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut line = format!("{} {}:", meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        LOG_LINES.lock().unwrap().push(line);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            *self.0 += &format!(" {value:?}");
        } else {
            *self.0 += &format!(" {}={value:?}", field.name());
        }
    }
}

/// A running guest; failing stops it and shows its console and the VMM's logs.
struct Run {
    vm: Vm,
    console: Console,
}

impl Run {
    fn fail(&self, what: impl Display) -> ! {
        self.vm.stop();
        panic!(
            "{what}\nVM exit: {:?}\nguest console:\n{}\nVMM log:\n{}",
            self.vm.exit(),
            self.console.text(),
            Logs::text()
        );
    }

    fn wait_exit(&self, timeout: Duration) -> VmExit {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.vm.exit() {
                return exit;
            }
            if Instant::now() > deadline {
                self.fail(format!("the guest did not end within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What the guest writes to sector 1 (as `sector1()` in the guest's `main.rs`).
fn expected_sector1() -> Vec<u8> {
    let line = b"test-guest wrote sector 1\n";
    (0..SECTOR)
        .map(|i| line.get(i).copied().unwrap_or(i as u8))
        .collect()
}

/// A 1 MiB disk: sector 0 holds [`DISK_LINE`], sector 1 is filled with 0xee (to be replaced).
fn make_disk(path: &Path) {
    let mut disk = vec![0u8; 1 << 20];
    disk[..DISK_LINE.len()].copy_from_slice(DISK_LINE.as_bytes());
    disk[DISK_LINE.len()] = b'\n';
    disk[SECTOR..2 * SECTOR].fill(0xee);
    std::fs::write(path, disk).unwrap();
}

fn accept_within(listener: &UnixListener, timeout: Duration) -> io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line)
}

/// The host side of the guest's connection to port 1234: reads its line, answers
/// `hello guest`. Returns the line and the stream (kept open until the VM ended).
fn serve_port_1234(listener: UnixListener) -> io::Result<(String, UnixStream)> {
    let mut stream = accept_within(&listener, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let line = read_line(&mut BufReader::new(&stream))?;
    stream.write_all(b"hello guest\n")?;
    Ok((line, stream))
}

/// A host-initiated connection to guest port 5000, through the hybrid-vsock handshake. Returns
/// the stream and the handshake's answer.
fn connect_port_5000(uds: &Path) -> io::Result<(BufReader<UnixStream>, String)> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"CONNECT 5000\n")?;
    let mut reader = BufReader::new(stream);
    let ok = read_line(&mut reader)?;
    Ok((reader, ok))
}

#[test]
fn test_guest_drives_block_and_vsock_with_virtio_drivers() {
    if !have_kvm() {
        return;
    }
    Logs::install();
    let kernel = guest().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_disk(&disk);
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let host_1234 = std::thread::spawn(move || serve_port_1234(listener));

    let console = Console::default();
    let started = Instant::now();
    let vm = Vm::start(VmmConfig {
        kernel,
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: 64,
        console: Box::new(console.clone()),
        block: Some(BlockConfig {
            path: disk.clone(),
            read_only: false,
        }),
        spare_disks: 0,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        }),
        net: None,
    })
    .unwrap_or_else(|e| panic!("Vm::start: {}", switchyard_base::chain(&e)));
    let run = Run { vm, console };

    // Guest port 5000 once the guest listens: the handshake, one echoed line, then `done`.
    if !run
        .console
        .wait_for("vsock: listening on port 5000", TIMEOUT)
    {
        run.fail("the guest never listened on vsock port 5000");
    }
    let (mut echo, ok) =
        connect_port_5000(&uds).unwrap_or_else(|e| run.fail(format!("CONNECT 5000: {e}")));
    let host_port = ok
        .strip_prefix("OK ")
        .and_then(|n| n.strip_suffix('\n'))
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| run.fail(format!("CONNECT 5000 answered {ok:?}")));
    let echoed = (|| {
        echo.get_mut().write_all(b"echo me\n")?;
        let line = read_line(&mut echo)?;
        echo.get_mut().write_all(b"done\n")?;
        io::Result::Ok(line)
    })()
    .unwrap_or_else(|e| run.fail(format!("vsock port 5000: {e}")));
    assert_eq!(echoed, "echo me\n", "echo on port 5000");

    let exit = run.wait_exit(TIMEOUT);
    let elapsed = started.elapsed();
    let (sent, _stream) = host_1234
        .join()
        .unwrap()
        .unwrap_or_else(|e| run.fail(format!("vsock port 1234: {e}")));
    let text = run.console.text();
    eprintln!("guest console:\n{text}\nVMM log:\n{}", Logs::text());

    assert!(
        matches!(exit, VmExit::Reset),
        "VM exit {exit:?}, console:\n{text}"
    );
    assert_eq!(
        sent,
        format!("disk: {DISK_LINE}\n"),
        "guest → host port 1234"
    );

    let lines: Vec<&str> = text.lines().collect();
    let position = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no console line {prefix:?} in:\n{text}"))
    };
    let done = position("test-guest: ok");
    for prefix in [
        "test-guest: started",
        "virtio-mmio 0: Block",
        "blk: capacity 2048 sectors",
        &format!("blk: sector 0: {DISK_LINE}"),
        "blk: wrote sector 1, flushed",
        "virtio-mmio 1: Socket",
        &format!("vsock: guest cid {GUEST_CID}"),
        &format!("vsock: accepted port 5000 from host port {host_port}"),
        "vsock: host replied: hello guest",
        "vsock: echoed echo me",
        "vsock: echo done",
    ] {
        assert!(position(prefix) < done, "{prefix:?} after the end:\n{text}");
    }
    assert!(!text.contains("panic"), "guest panicked:\n{text}");

    let mut file = std::fs::File::open(&disk).unwrap();
    let mut sectors = vec![0u8; 2 * SECTOR];
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_exact(&mut sectors).unwrap();
    assert!(
        sectors[..SECTOR].starts_with(format!("{DISK_LINE}\n").as_bytes()),
        "sector 0 changed"
    );
    assert_eq!(sectors[SECTOR..], expected_sector1()[..], "sector 1");

    let boot = run.vm.boot_time().expect("the boot timer fired");
    assert!(
        !boot.is_zero() && boot <= elapsed,
        "boot time {boot:?}, run {elapsed:?}"
    );
    eprintln!("test guest: boot timer {boot:?}, whole run {elapsed:?}");
}
