//! Runtime mode: `containerd-shim-yard-native-v1 runtime [--root R] [--log F] COMMAND ...`.
//!
//! libcontainer clones with raw `clone3` and runs Rust code in the child, which is only sound in
//! a single-threaded process. The shim server is a tokio process, so it re-executes its own binary
//! in this mode for every create and exec, like it would run `runc`: the command line is the
//! subset of runc's that the shim uses (`create`, `start`, `exec`, `delete`), which lets the
//! shim drive either this mode or a real `runc` (`binary_name` option) through the same code.
//!
//! Stdio of this process is the container's stdio, so nothing is ever written to it: errors go to
//! the `--log` file as one line, and the exit code says what kind: 2 for a spec the caller must
//! fix, 1 for everything else.

use std::io::Write;
use std::path::PathBuf;

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;

pub const MODE: &str = "runtime";

/// Exit code for errors the caller caused (bad spec, bad id).
pub const EXIT_INVALID: i32 = 2;

#[derive(Debug, Default)]
struct Global {
    root: PathBuf,
    log: Option<PathBuf>,
}

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
            message: yard_shim_kit::error::chain(&e),
        }
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure {
        invalid: true,
        message: msg.into(),
    }
}

/// Entry point; `args` are the arguments after `runtime`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let mut g = Global {
        root: PathBuf::from("/run/yard-native"),
        log: None,
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--root" => {
                i += 1;
                g.root = args.get(i).map(PathBuf::from).unwrap_or_default();
            }
            "--log" => {
                i += 1;
                g.log = args.get(i).map(PathBuf::from);
            }
            "--log-format" => i += 1,
            "--systemd-cgroup" | "--debug" => {}
            _ => break,
        }
        i += 1;
    }
    init_logging(&g);
    let rest = &args[i.min(args.len())..];
    let result = match rest.first().map(String::as_str) {
        Some("create") => create(&g, &rest[1..]),
        Some("start") => one_id(&rest[1..]).and_then(|id| start(&g, &id)),
        Some("exec") => exec(&g, &rest[1..]),
        Some("delete") => delete(&g, &rest[1..]),
        Some(other) => Err(usage(format!("unknown runtime command {other:?}"))),
        None => Err(usage("missing runtime command")),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            report(&g, &f.message);
            if f.invalid { EXIT_INVALID } else { 1 }
        }
    }
}

/// libcontainer's own warnings and errors go to the log file too (never to stdio).
fn init_logging(g: &Global) {
    let Some(path) = &g.log else { return };
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_target(false)
            .without_time()
            .try_init();
    }
}

/// The last line of the log is the error the shim reports.
fn report(g: &Global, message: &str) {
    if let Some(path) = &g.log
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "error: {message}");
    }
}

/// libcontainer's default workload, except that an absolute `args[0]` runs without `PATH` in the
/// process environment, as with runc (ctr sends no environment with `--rootfs`).
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

fn one_id(args: &[String]) -> Result<String, Failure> {
    match args {
        [id] => Ok(id.clone()),
        _ => Err(usage("expected exactly one container id")),
    }
}

struct Flags {
    values: Vec<(String, String)>,
    switches: Vec<String>,
    positional: Vec<String>,
}

fn parse(args: &[String], with_value: &[&str]) -> Flags {
    let mut f = Flags {
        values: Vec::new(),
        switches: Vec::new(),
        positional: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(name) = a.strip_prefix("--") {
            if let Some((k, v)) = name.split_once('=') {
                f.values.push((k.to_owned(), v.to_owned()));
            } else if with_value.contains(&name) {
                i += 1;
                f.values
                    .push((name.to_owned(), args.get(i).cloned().unwrap_or_default()));
            } else {
                f.switches.push(name.to_owned());
            }
        } else {
            f.positional.push(a.clone());
        }
        i += 1;
    }
    f
}

impl Flags {
    fn value(&self, name: &str) -> Option<PathBuf> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| PathBuf::from(v))
    }
}

fn create(g: &Global, args: &[String]) -> Result<(), Failure> {
    let f = parse(
        args,
        &["bundle", "pid-file", "console-socket", "preserve-fds"],
    );
    let id = one_id(&f.positional)?;
    let bundle = f
        .value("bundle")
        .ok_or_else(|| usage("--bundle is required"))?;
    let builder = ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(&g.root)?
        .with_pid_file(f.value("pid-file"))?
        .with_console_socket(f.value("console-socket"))
        .with_executor(Workload)
        .validate_id()?;
    builder
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()?;
    Ok(())
}

fn load(g: &Global, id: &str) -> Result<Container, Failure> {
    Ok(Container::load(g.root.join(id))?)
}

fn start(g: &Global, id: &str) -> Result<(), Failure> {
    load(g, id)?.start()?;
    Ok(())
}

fn exec(g: &Global, args: &[String]) -> Result<(), Failure> {
    let f = parse(args, &["process", "pid-file", "console-socket"]);
    let id = one_id(&f.positional)?;
    let process = f
        .value("process")
        .ok_or_else(|| usage("--process is required"))?;
    ContainerBuilder::new(id, SyscallType::default())
        .with_root_path(&g.root)?
        .with_pid_file(f.value("pid-file"))?
        .with_console_socket(f.value("console-socket"))
        .with_executor(Workload)
        .validate_id()?
        .as_tenant()
        .with_process(Some(process))
        .with_detach(true)
        .build()?;
    Ok(())
}

fn delete(g: &Global, args: &[String]) -> Result<(), Failure> {
    let f = parse(args, &[]);
    let id = one_id(&f.positional)?;
    let force = f.switches.iter().any(|s| s == "force");
    match Container::load(g.root.join(&id)) {
        Ok(mut c) => Ok(c.delete(force)?),
        // Already gone: delete is idempotent, as `runc delete --force` is.
        Err(_) if force => Ok(()),
        Err(e) => Err(e.into()),
    }
}
