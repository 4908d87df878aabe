//! Runtime mode: `<binary> runtime [--root R] [--log F] [--debug] create|start|exec|delete ...`,
//! the single-threaded libcontainer front end that the native shim
//! (`containerd-shim-yard-native-v1 runtime ...`) and the guest agent (`yard-agent runtime ...`)
//! re-execute themselves into.
//!
//! libcontainer clones with raw `clone3` and runs Rust code in the child, which is only sound in a
//! single-threaded process; both callers are tokio processes, so they run their own binary in
//! this mode for every create and exec, as they would run `runc`. The command line is the subset
//! of runc's they use (see `flags.rs`), which also lets the native shim drive a real runc through
//! the same code.
//!
//! stdio of this process is the container's, so nothing is ever written to it: the `--log` file
//! gets libcontainer's warnings and, on failure, one error record that [`last_error`] reads back
//! (see `log.rs`). The exit code says what kind of failure: [`EXIT_INVALID`] for a request or
//! spec the caller must fix, [`EXIT_FAILED`] for everything else.
//!
//! Beyond libcontainer 0.7 this mode: maps runc's `rshared`/`rslave`/`rprivate` root
//! propagation, and hands libcontainer `noNewPrivileges` and masked seccomp comparisons in the
//! form it reads as runc reads the original (`spec.rs`); names why the kernel refused a seccomp
//! filter (`seccomp.rs`); gives an exec'd process its container's seccomp filter and, for what
//! the process does not set, its capabilities, `no_new_privs`, AppArmor profile, SELinux label
//! and rlimits, as runc does (`workload.rs`); and refuses what it cannot honour rather than run
//! the process less confined (a seccomp filter in a build without libseccomp, an exec into a
//! container with a user namespace).

#[cfg(feature = "engine")]
pub mod engine;
mod flags;
mod home;
pub mod inroot;
mod log;
#[cfg(feature = "seccomp")]
pub mod seccomp;
pub mod spec;
mod workload;

use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use oci_spec::runtime::{Process, Spec};

use flags::{Command, Globals, Io};
pub use log::last_error;
use spec::SpecError;
use workload::Workload;

/// The first argument that selects runtime mode.
pub const MODE: &str = "runtime";
/// Exit code for a failure that is not the caller's.
pub const EXIT_FAILED: i32 = 1;
/// Exit code for a request or spec the caller must fix (a shim answers InvalidArgument).
pub const EXIT_INVALID: i32 = 2;

/// What differs between the callers.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// libcontainer's state directory when the command line gives no `--root`.
    pub default_root: &'static str,
    /// Runs in this single-threaded process after a successful create, with the init's pid (the
    /// agent brings up the loopback interface of a new network namespace, as runc does). A
    /// failure is logged as a warning.
    pub after_create: Option<fn(i32) -> std::io::Result<()>>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Usage(#[from] flags::FlagError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{what}")]
    Libcontainer {
        what: String,
        #[source]
        source: LibcontainerError,
    },
    #[error("exec: process {}", path.display())]
    Process {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("exec: write the process for libcontainer to {}", path.display())]
    WriteProcess {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// libcontainer's own error says only "failed to load seccomp context".
    #[cfg(feature = "seccomp")]
    #[error("{what}: linux.seccomp: the kernel refused the filter: {refusal}")]
    SeccompRefused {
        what: String,
        refusal: seccomp::Refusal,
    },
}

impl Error {
    fn libcontainer(what: impl Into<String>) -> impl FnOnce(LibcontainerError) -> Error {
        let what = what.into();
        move |source| Error::Libcontainer { what, source }
    }

    /// [`Error::libcontainer`] for a create or exec whose process loads `seccomp`: a filter the
    /// kernel refused is named with the reason.
    fn loading(
        what: String,
        seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
        loader: spec::FilterLoader,
    ) -> impl FnOnce(LibcontainerError) -> Error {
        move |source| {
            #[cfg(feature = "seccomp")]
            if let Some(s) = seccomp
                && switchyard_base::chain(&source).contains(seccomp::LOAD_FAILED)
            {
                let refusal = seccomp::diagnose(s, loader);
                return Error::SeccompRefused { what, refusal };
            }
            #[cfg(not(feature = "seccomp"))]
            let _ = (seccomp, loader);
            Error::Libcontainer { what, source }
        }
    }

    fn exit_code(&self) -> i32 {
        let invalid = match self {
            Error::Usage(_) | Error::Process { .. } => true,
            Error::Spec(e) => !matches!(e, SpecError::Save { .. }),
            Error::Libcontainer { source, .. } => matches!(
                source,
                LibcontainerError::InvalidInput(_)
                    | LibcontainerError::InvalidID(_)
                    | LibcontainerError::MissingSpec(_)
                    | LibcontainerError::InvalidSpec(_)
                    | LibcontainerError::Spec(_)
            ),
            Error::WriteProcess { .. } => false,
            #[cfg(feature = "seccomp")]
            Error::SeccompRefused { refusal, .. } => refusal.is_the_profiles(),
        };
        if invalid { EXIT_INVALID } else { EXIT_FAILED }
    }

    /// The chain, with the detail libcontainer's `InvalidInput` keeps out of its message.
    fn message(&self) -> String {
        let mut m = switchyard_base::chain(self);
        if let Error::Libcontainer {
            source: LibcontainerError::InvalidInput(detail),
            ..
        } = self
        {
            m.push_str(": ");
            m.push_str(detail);
        }
        m
    }
}

/// Entry point; `args` are the arguments after [`MODE`]. Returns the process exit code.
pub fn main(args: &[String], options: &Options) -> i32 {
    let parsed = flags::parse(args);
    let log = log::Log::init(parsed.globals.log.as_deref(), parsed.globals.debug);
    let result = parsed
        .command
        .map_err(Error::from)
        .and_then(|c| run(&parsed.globals, options, c));
    match result {
        Ok(()) => 0,
        Err(e) => {
            log.failure(&e.message());
            e.exit_code()
        }
    }
}

fn run(g: &Globals, options: &Options, command: Command) -> Result<(), Error> {
    let root = g
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(options.default_root));
    match command {
        Command::Create { id, bundle, io } => create(&root, options, id, &bundle, io),
        Command::Start { id } => {
            let mut c = load(&root, &id)?;
            c.start()
                .map_err(Error::libcontainer(format!("start container {id}")))
        }
        Command::Exec { id, process, io } => exec(&root, id, &process, io),
        Command::Delete { id, force } => match Container::load(root.join(&id)) {
            Ok(mut c) => c
                .delete(force)
                .map_err(Error::libcontainer(format!("delete container {id}"))),
            // Already gone: delete is idempotent, as `runc delete --force` is.
            Err(_) if force => Ok(()),
            Err(e) => Err(Error::libcontainer(format!("load container {id}"))(e)),
        },
    }
}

fn load(root: &Path, id: &str) -> Result<Container, Error> {
    Container::load(root.join(id)).map_err(Error::libcontainer(format!("load container {id}")))
}

fn builder(
    root: &Path,
    id: &str,
    io: Io,
    workload: Workload,
) -> Result<ContainerBuilder, LibcontainerError> {
    ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_root_path(root)?
        .with_pid_file(io.pid_file)?
        .with_console_socket(io.console_socket)
        .with_preserved_fds(io.preserve_fds)
        .with_executor(workload)
        .validate_id()
}

fn create(root: &Path, options: &Options, id: String, bundle: &Path, io: Io) -> Result<(), Error> {
    let spec = spec::prepare_bundle(bundle)?;
    let failed = Error::loading(
        format!("create container {id}"),
        spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()),
        spec::FilterLoader::init(&spec),
    );
    let container = builder(root, &id, io, Workload::default())
        .and_then(|b| {
            b.as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        })
        .map_err(failed)?;
    if let (Some(after), Some(pid)) = (options.after_create, container.pid())
        && let Err(e) = after(pid.as_raw())
    {
        tracing::warn!(container_id = id, error = %e, "after create");
    }
    Ok(())
}

/// Joins a running container, confined as its init is (see `workload.rs`).
fn exec(root: &Path, id: String, process_path: &Path, io: Io) -> Result<(), Error> {
    let container = load(root, &id)?;
    let config = container.bundle().join("config.json");
    let init = Spec::load(&config).map_err(|source| SpecError::Load {
        path: config,
        source,
    })?;
    let mut process = read_process(process_path)?;
    spec::inherit(&init, &mut process);
    // The container's own view of its root, mounts on it included, as runc reads it.
    let container_root = match container.pid() {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/root")),
        None => container.bundle().join(
            init.root()
                .as_ref()
                .map_or(Path::new("rootfs"), |r| r.path()),
        ),
    };
    // That view shows the container's mounts already.
    home::set_home(&mut process, &container_root, &[], container.bundle());
    spec::check_exec(&init)?;
    let mut seccomp = init.linux().as_ref().and_then(|l| l.seccomp().clone());
    if let Some(s) = &mut seccomp
        && !spec::prepared(&init)
    {
        // A container an older runtime made: its config.json is as the caller wrote it.
        spec::masked_eq_for_libcontainer(s)?;
    }
    let loader = spec::FilterLoader::exec(process.no_new_privileges() == Some(true));
    let workload = Workload::for_exec(seccomp.as_ref(), &mut process)?;
    // libcontainer reads the process from a file; this one lives with the container's state.
    let resolved = root
        .join(&id)
        .join(format!("exec-{}.json", std::process::id()));
    let bytes = serde_json::to_vec(&process).map_err(|e| Error::WriteProcess {
        path: resolved.clone(),
        source: e.into(),
    })?;
    std::fs::write(&resolved, bytes).map_err(|source| Error::WriteProcess {
        path: resolved.clone(),
        source,
    })?;
    let result = builder(root, &id, io, workload).and_then(|b| {
        b.as_tenant()
            .with_process(Some(&resolved))
            .with_detach(true)
            .build()
    });
    let _ = std::fs::remove_file(&resolved);
    let failed = Error::loading(format!("exec in container {id}"), seccomp.as_ref(), loader);
    result.map(drop).map_err(failed)
}

fn read_process(path: &Path) -> Result<Process, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Process {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Process {
        path: path.to_owned(),
        source: e.into(),
    })
}
