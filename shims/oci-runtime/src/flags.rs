//! The command line: `[--root R] [--log F] [--debug] COMMAND [FLAGS] ID`, the subset of runc's that
//! the native shim and the guest agent use.
//!
//! Unknown flags are refused, not skipped. Our own shim and agent are the only callers and they
//! build these command lines, so a flag this parser does not know is a caller bug; skipping it
//! would let a setting the caller believes applied (`--preserve-fds`, `--no-new-keyring`,
//! `--systemd-cgroup`) silently not happen, which for the code that applies a container's
//! confinement is the wrong way to fail. runc-only flags (`--log-format json`) are passed only to
//! an external runc (`BinaryName`), never here.

use std::path::PathBuf;

/// What the caller asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Create {
        id: String,
        bundle: PathBuf,
        io: Io,
    },
    Start {
        id: String,
    },
    Exec {
        id: String,
        process: PathBuf,
        io: Io,
    },
    Delete {
        id: String,
        force: bool,
    },
}

/// Where the new process's pid and terminal go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Io {
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    /// Descriptors 3.. of this process the container process keeps.
    pub preserve_fds: i32,
}

/// The flags before the command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Globals {
    pub root: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub debug: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FlagError {
    #[error("missing runtime command (create, start, exec or delete)")]
    MissingCommand,
    #[error("unknown runtime command {0:?}")]
    UnknownCommand(String),
    #[error("{command}: unknown flag {flag}")]
    UnknownFlag { command: &'static str, flag: String },
    #[error("{command}: {flag} needs a value")]
    MissingValue { command: &'static str, flag: String },
    #[error("{command}: {flag} takes no value")]
    UnexpectedValue { command: &'static str, flag: String },
    #[error("{command}: {flag} {value:?}: {why}")]
    BadValue {
        command: &'static str,
        flag: String,
        value: String,
        why: &'static str,
    },
    #[error("{command}: {flag} is required")]
    Required {
        command: &'static str,
        flag: &'static str,
    },
    #[error("{command}: expected exactly one container id, got {got}")]
    Ids { command: &'static str, got: usize },
}

/// The parse: the global flags read before any error (so an error can still go to `--log`), and
/// the command or why there is none.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub globals: Globals,
    pub command: Result<Command, FlagError>,
}

/// One `--name`, `--name value` or `--name=value` word (and the next word when it is the value).
struct Words<'a> {
    args: &'a [String],
    at: usize,
    command: &'static str,
}

enum Word<'a> {
    Flag {
        name: &'a str,
        inline: Option<&'a str>,
    },
    Positional(&'a str),
}

impl<'a> Words<'a> {
    fn next(&mut self) -> Option<Word<'a>> {
        let a = self.args.get(self.at)?;
        self.at += 1;
        // Any word starting with `-` is a flag (`--` and short forms included: none is ours),
        // so a misspelt flag is never taken for the container id.
        if !a.starts_with('-') {
            return Some(Word::Positional(a));
        }
        let flag = a.strip_prefix("--").unwrap_or(a);
        Some(match flag.split_once('=') {
            Some((name, value)) => Word::Flag {
                name,
                inline: Some(value),
            },
            None => Word::Flag {
                name: flag,
                inline: None,
            },
        })
    }

    /// The value of `--name`: inline, or the next word.
    fn value(&mut self, name: &str, inline: Option<&'a str>) -> Result<&'a str, FlagError> {
        if let Some(v) = inline {
            return Ok(v);
        }
        let v = self
            .args
            .get(self.at)
            .ok_or_else(|| FlagError::MissingValue {
                command: self.command,
                flag: format!("--{name}"),
            })?;
        self.at += 1;
        Ok(v)
    }

    fn switch(&self, name: &str, inline: Option<&str>) -> Result<(), FlagError> {
        match inline {
            None => Ok(()),
            Some(_) => Err(FlagError::UnexpectedValue {
                command: self.command,
                flag: format!("--{name}"),
            }),
        }
    }

    /// The word just read, as the caller wrote it.
    fn unknown(&self) -> FlagError {
        let word = self
            .args
            .get(self.at.saturating_sub(1))
            .map_or("", String::as_str);
        FlagError::UnknownFlag {
            command: self.command,
            flag: word.split_once('=').map_or(word, |(f, _)| f).to_owned(),
        }
    }
}

pub(crate) fn parse(args: &[String]) -> Parsed {
    let mut globals = Globals::default();
    let command = parse_into(args, &mut globals);
    Parsed { globals, command }
}

fn parse_into(args: &[String], g: &mut Globals) -> Result<Command, FlagError> {
    let mut w = Words {
        args,
        at: 0,
        command: "runtime",
    };
    let command = loop {
        match w.next() {
            None => return Err(FlagError::MissingCommand),
            Some(Word::Positional(c)) => break c,
            Some(Word::Flag { name, inline }) => match name {
                "root" => g.root = Some(PathBuf::from(w.value(name, inline)?)),
                "log" => g.log = Some(PathBuf::from(w.value(name, inline)?)),
                "debug" => {
                    w.switch(name, inline)?;
                    g.debug = true;
                }
                _ => return Err(w.unknown()),
            },
        }
    };
    let command: &'static str = match command {
        "create" => "create",
        "start" => "start",
        "exec" => "exec",
        "delete" => "delete",
        other => return Err(FlagError::UnknownCommand(other.to_owned())),
    };
    w.command = command;
    let mut io = Io::default();
    let mut bundle = None;
    let mut process = None;
    let mut force = false;
    let mut ids = Vec::new();
    while let Some(word) = w.next() {
        let (name, inline) = match word {
            Word::Positional(p) => {
                ids.push(p.to_owned());
                continue;
            }
            Word::Flag { name, inline } => (name, inline),
        };
        match (command, name) {
            ("create", "bundle") => bundle = Some(PathBuf::from(w.value(name, inline)?)),
            ("exec", "process") => process = Some(PathBuf::from(w.value(name, inline)?)),
            ("create" | "exec", "pid-file") => {
                io.pid_file = Some(PathBuf::from(w.value(name, inline)?));
            }
            ("create" | "exec", "console-socket") => {
                io.console_socket = Some(PathBuf::from(w.value(name, inline)?));
            }
            ("create" | "exec", "preserve-fds") => {
                let v = w.value(name, inline)?;
                io.preserve_fds = v
                    .parse::<i32>()
                    .ok()
                    .filter(|n| (0..=1024).contains(n))
                    .ok_or_else(|| FlagError::BadValue {
                        command,
                        flag: "--preserve-fds".into(),
                        value: v.to_owned(),
                        why: "not a count from 0 to 1024",
                    })?;
            }
            // This runtime always detaches (the caller owns the process's stdio and reaps it);
            // runc needs the flag for that, so the shim's shared command line carries it.
            ("exec", "detach") => w.switch(name, inline)?,
            ("delete", "force") => {
                w.switch(name, inline)?;
                force = true;
            }
            _ => return Err(w.unknown()),
        }
    }
    let id = match <[String; 1]>::try_from(ids) {
        Ok([id]) => id,
        Err(ids) => {
            return Err(FlagError::Ids {
                command,
                got: ids.len(),
            });
        }
    };
    let required = |flag| FlagError::Required { command, flag };
    Ok(match command {
        "create" => Command::Create {
            id,
            bundle: bundle.ok_or_else(|| required("--bundle"))?,
            io,
        },
        "start" => Command::Start { id },
        "exec" => Command::Exec {
            id,
            process: process.ok_or_else(|| required("--process"))?,
            io,
        },
        _ => Command::Delete { id, force },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn ok(s: &str) -> (Globals, Command) {
        let p = parse(&args(s));
        match p.command {
            Ok(c) => (p.globals, c),
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str) -> (Globals, String) {
        let p = parse(&args(s));
        match p.command {
            Ok(c) => panic!("{s}: accepted as {c:?}"),
            Err(e) => (p.globals, e.to_string()),
        }
    }

    #[test]
    fn the_shims_create_and_exec_lines_parse() {
        let (g, c) = ok("--root /run/r --log /l create --bundle /b --pid-file /p c1");
        assert_eq!(g.root.as_deref(), Some(std::path::Path::new("/run/r")));
        assert_eq!(g.log.as_deref(), Some(std::path::Path::new("/l")));
        assert!(!g.debug);
        assert_eq!(
            c,
            Command::Create {
                id: "c1".into(),
                bundle: "/b".into(),
                io: Io {
                    pid_file: Some("/p".into()),
                    ..Io::default()
                }
            }
        );
        let (_, c) = ok(
            "--root /r --log /l exec --process /x.json --detach --pid-file /p --console-socket /s c1",
        );
        assert_eq!(
            c,
            Command::Exec {
                id: "c1".into(),
                process: "/x.json".into(),
                io: Io {
                    pid_file: Some("/p".into()),
                    console_socket: Some("/s".into()),
                    preserve_fds: 0,
                }
            }
        );
    }

    #[test]
    fn the_agents_lines_parse() {
        let (g, c) = ok("--log /l --debug create --bundle /b --pid-file /p --console-socket /s c1");
        assert!(g.debug);
        assert!(g.root.is_none());
        assert!(matches!(c, Command::Create { ref id, .. } if id == "c1"));
        let (_, c) = ok("--log /l exec --process /x --pid-file /p c1");
        assert!(matches!(c, Command::Exec { .. }));
    }

    #[test]
    fn equals_forms_flags_after_the_id_and_the_other_commands() {
        let (g, c) = ok("--root=/r --log=/l create c1 --bundle=/b --preserve-fds=2");
        assert_eq!(g.root.as_deref(), Some(std::path::Path::new("/r")));
        assert!(
            matches!(c, Command::Create { ref bundle, ref io, .. } if bundle.as_os_str() == "/b" && io.preserve_fds == 2)
        );
        assert_eq!(ok("start c1").1, Command::Start { id: "c1".into() });
        assert_eq!(
            ok("delete --force c1").1,
            Command::Delete {
                id: "c1".into(),
                force: true
            }
        );
        assert_eq!(
            ok("delete c1").1,
            Command::Delete {
                id: "c1".into(),
                force: false
            }
        );
    }

    #[test]
    fn unknown_flags_are_refused_naming_them() {
        for (line, want) in [
            (
                "--bogus create --bundle /b c1",
                "runtime: unknown flag --bogus",
            ),
            ("--systemd-cgroup create --bundle /b c1", "--systemd-cgroup"),
            ("--log-format json create --bundle /b c1", "--log-format"),
            (
                "create --bundle /b --no-pivot c1",
                "create: unknown flag --no-pivot",
            ),
            // A flag of another command is unknown here.
            (
                "create --bundle /b --process /p c1",
                "create: unknown flag --process",
            ),
            ("exec --process /p --force c1", "exec: unknown flag --force"),
            ("delete --detach c1", "delete: unknown flag --detach"),
        ] {
            let (_, e) = err(line);
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (line, want) in [
            ("", "missing runtime command"),
            ("--log /l", "missing runtime command"),
            ("--log", "runtime: --log needs a value"),
            ("run c1", "unknown runtime command \"run\""),
            ("create c1", "create: --bundle is required"),
            ("exec c1", "exec: --process is required"),
            (
                "create --bundle /b",
                "create: expected exactly one container id, got 0",
            ),
            (
                "start a b",
                "start: expected exactly one container id, got 2",
            ),
            ("create --bundle", "create: --bundle needs a value"),
            ("--debug=yes start c1", "runtime: --debug takes no value"),
            ("delete --force=1 c1", "delete: --force takes no value"),
            (
                "create --bundle /b --preserve-fds x c1",
                "--preserve-fds \"x\"",
            ),
            ("create --bundle /b --preserve-fds -1 c1", "not a count"),
            ("create --bundle /b c1 -- x", "create: unknown flag --"),
            ("exec --process /p -d c1", "exec: unknown flag -d"),
        ] {
            let (_, e) = err(line);
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn the_log_is_known_even_when_the_rest_is_wrong() {
        let (g, _) = err("--log /l --debug create --bogus c1");
        assert_eq!(g.log.as_deref(), Some(std::path::Path::new("/l")));
        assert!(g.debug);
    }
}
