//! Runtime mode: `yard-agent runtime --log F [--debug] create|exec ...`.
//!
//! libcontainer clones with raw `clone3` and runs Rust code in the child, which is only sound in
//! a single-threaded process. The agent is a tokio process, so it re-executes its own binary in
//! this mode for every container create and exec, as the native shim does. Start and delete need
//! no fork and run in the agent.
//!
//! The stdio of this process is the container's, so nothing is ever written to it: errors go to
//! the `--log` file, the last line being `error: ...`, and the exit code says what kind: 2 for a
//! request the caller must fix, 1 for everything else.

use std::io::Write;
use std::path::{Path, PathBuf};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

use crate::error::chain;

pub const MODE: &str = "runtime";

/// Exit code for errors the caller caused (a bad spec or process).
pub const EXIT_INVALID: i32 = 2;

/// libcontainer's state directory (one subdirectory per container).
pub const STATE_ROOT: &str = "/run/yard/state";

struct Failure {
    invalid: bool,
    message: String,
}

impl From<LibcontainerError> for Failure {
    fn from(e: LibcontainerError) -> Failure {
        let invalid = matches!(
            e,
            LibcontainerError::InvalidInput(_)
                | LibcontainerError::InvalidID(_)
                | LibcontainerError::MissingSpec(_)
                | LibcontainerError::InvalidSpec(_)
                | LibcontainerError::Spec(_)
        );
        Failure {
            invalid,
            message: chain(&e),
        }
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        invalid: true,
        message: msg.into(),
    }
}

#[derive(Default)]
struct Flags {
    log: Option<PathBuf>,
    debug: bool,
    bundle: Option<PathBuf>,
    process: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    console_socket: Option<PathBuf>,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Flags, Failure> {
    let mut f = Flags::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--log" => f.log = Some(value("--log")?),
            "--debug" => f.debug = true,
            "--bundle" => f.bundle = Some(value("--bundle")?),
            "--process" => f.process = Some(value("--process")?),
            "--pid-file" => f.pid_file = Some(value("--pid-file")?),
            "--console-socket" => f.console_socket = Some(value("--console-socket")?),
            other if other.starts_with("--") => {
                return Err(usage(format!("unknown flag {other}")));
            }
            other => f.positional.push(other.to_owned()),
        }
    }
    Ok(f)
}

/// Entry point; `args` are the arguments after `runtime`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let flags = match parse(args) {
        Ok(f) => f,
        Err(f) => {
            report(None, &f.message);
            return EXIT_INVALID;
        }
    };
    init_logging(&flags);
    let result = match flags.positional.split_first() {
        Some((cmd, rest)) if cmd == "create" => one_id(rest).and_then(|id| create(&flags, id)),
        Some((cmd, rest)) if cmd == "exec" => one_id(rest).and_then(|id| exec(&flags, id)),
        Some((cmd, _)) => Err(usage(format!("unknown runtime command {cmd:?}"))),
        None => Err(usage("missing runtime command")),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            report(flags.log.as_deref(), &f.message);
            if f.invalid { EXIT_INVALID } else { 1 }
        }
    }
}

/// libcontainer's own warnings (and everything with `--debug`) go to the log file, never to
/// stdio.
fn init_logging(flags: &Flags) {
    let Some(path) = &flags.log else { return };
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let level = if flags.debug {
            tracing::Level::DEBUG
        } else {
            tracing::Level::WARN
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .with_max_level(level)
            .with_target(false)
            .without_time()
            .try_init();
    }
}

/// The last line of the log is the error the agent reports.
fn report(log: Option<&Path>, message: &str) {
    if let Some(path) = log
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "error: {message}");
    }
}

/// The last `error: ` line of a runtime log.
pub fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: ").map(str::to_owned))
}

fn one_id(args: &[String]) -> Result<&str, Failure> {
    match args {
        [id] => Ok(id),
        _ => Err(usage("expected exactly one container id")),
    }
}

/// libcontainer's default workload, except that an absolute `args[0]` runs without `PATH` in the
/// process environment, as with runc.
#[derive(Clone)]
struct Workload;

impl Executor for Workload {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref();
        let has_path = process
            .and_then(|p| p.env().as_ref())
            .is_some_and(|env| env.iter().any(|e| e.starts_with("PATH=")));
        let absolute = process
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first())
            .is_some_and(|a| a.contains('/'));
        if !has_path && absolute {
            return Ok(());
        }
        DefaultExecutor {}.validate(spec)
    }
}

fn builder(flags: &Flags, id: &str) -> Result<ContainerBuilder, Failure> {
    Ok(ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(STATE_ROOT)?
        .with_pid_file(flags.pid_file.clone())?
        .with_console_socket(flags.console_socket.clone())
        .with_executor(Workload)
        .validate_id()?)
}

fn create(flags: &Flags, id: &str) -> Result<(), Failure> {
    let bundle = flags
        .bundle
        .clone()
        .ok_or_else(|| usage("--bundle is required"))?;
    let container = builder(flags, id)?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    // A new network namespace has only a loopback interface, and it is down: bring it up, as
    // runc does. This process is single-threaded, so entering the namespace is sound.
    if let Some(pid) = container.pid()
        && let Err(e) = loopback_up(pid.as_raw())
    {
        tracing::warn!(error = %e, "bring up lo in the container's network namespace");
    }
    Ok(())
}

fn loopback_up(pid: i32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let theirs = Path::new("/proc").join(pid.to_string()).join("ns/net");
    if std::fs::metadata(&theirs)?.ino() == std::fs::metadata("/proc/self/ns/net")?.ino() {
        return Ok(());
    }
    let ns = std::fs::File::open(&theirs)?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    crate::sys::set_link_up("lo")
}

fn exec(flags: &Flags, id: &str) -> Result<(), Failure> {
    let process = flags
        .process
        .clone()
        .ok_or_else(|| usage("--process is required"))?;
    builder(flags, id)?
        .as_tenant()
        .with_process(Some(process))
        .with_detach(true)
        .build()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let args: Vec<String> = [
            "--log",
            "/l",
            "--debug",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "id1",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let f = parse(&args).unwrap_or_else(|f| panic!("{}", f.message));
        assert!(f.debug);
        assert_eq!(f.bundle.as_deref(), Some(Path::new("/b")));
        assert_eq!(f.positional, ["create", "id1"]);
        assert!(parse(&["--bogus".to_owned()]).is_err());
    }

    #[test]
    fn the_last_error_line_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "WARN something\nerror: first\nnoise\nerror: second\n").unwrap();
        assert_eq!(last_error(&log).as_deref(), Some("second"));
    }
}
