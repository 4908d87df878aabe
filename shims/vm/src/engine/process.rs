//! A process in the guest and the pumps that carry its stdio over the agent channel:
//! long-poll reads of stdout and stderr into containerd's fifos, stdin fed back with writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use yard_shim_kit::stdio::{self, StdinCloser, StdioSpec};
use yard_shim_kit::{Error, Exit, Process, Result};

use super::oom::OomReporter;
use crate::agent::{Agent, Read};

/// After a process exits, how long its output may still take to arrive (a background child
/// that keeps the pipe open would otherwise hold the exit forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// Largest stdio read per agent call.
pub const READ_CHUNK: u32 = 64 * 1024;
/// Replies to a stdio (or connection) read with neither data nor end of file, in a row, that the
/// shim takes before it calls the agent broken. The agent's reads are long polls, so it never
/// sends one; a guest that does would otherwise make the pump spin.
pub const MAX_EMPTY_READS: u32 = 8;

/// A pump's count of empty reads in a row ([`MAX_EMPTY_READS`]).
#[derive(Default)]
pub struct EmptyReads(u32);

impl EmptyReads {
    /// Notes what one read of `call` returned; false, the violation recorded, once too many
    /// in a row were empty.
    pub fn allow(&mut self, agent: &Agent, call: &'static str, read: &Read) -> bool {
        if !matches!(read, Read::Empty) {
            self.0 = 0;
            return true;
        }
        self.0 += 1;
        if self.0 < MAX_EMPTY_READS {
            return true;
        }
        agent.violation(
            call,
            format!(
                "{} replies in a row with neither data nor end of file",
                self.0
            ),
        );
        false
    }
}
/// The status of a process lost with its VM, as if killed by SIGKILL.
pub const LOST: u32 = 128 + 9;

pub struct VmProcess {
    agent: Agent,
    ooms: Arc<OomReporter>,
    container_id: String,
    exec_id: String,
    pid: AtomicU32,
    terminal: bool,
    stdin_closer: StdinCloser,
    exit: watch::Sender<Option<Exit>>,
    pumps: std::sync::Mutex<Option<Pumps>>,
}

struct Pumps {
    stdin: Option<tokio::fs::File>,
    stdout: tokio::fs::File,
    stderr: tokio::fs::File,
}

/// A process whose stdio is open but which no agent knows yet.
pub struct Unbound(Box<dyn FnOnce(Agent, Arc<OomReporter>) -> Arc<VmProcess> + Send>);

impl Unbound {
    pub fn bind(self, agent: Agent, ooms: Arc<OomReporter>) -> Arc<VmProcess> {
        (self.0)(agent, ooms)
    }
}

impl VmProcess {
    /// Opens the process's stdio (containerd's fifos or files).
    pub fn open(
        container_id: &str,
        exec_id: &str,
        spec: &StdioSpec,
        namespace: &str,
        terminal: bool,
    ) -> Result<Unbound> {
        let name = if exec_id.is_empty() {
            container_id.to_owned()
        } else {
            format!("{container_id}-{exec_id}")
        };
        let opened = stdio::open(spec, namespace, &name)?;
        let has_stdin = !spec.stdin.is_empty();
        let (container_id, exec_id) = (container_id.to_owned(), exec_id.to_owned());
        Ok(Unbound(Box::new(move |agent, ooms| {
            Arc::new(VmProcess {
                agent,
                ooms,
                container_id,
                exec_id,
                pid: AtomicU32::new(0),
                terminal,
                stdin_closer: opened.stdin_closer,
                exit: watch::channel(None).0,
                pumps: std::sync::Mutex::new(Some(Pumps {
                    stdin: has_stdin.then(|| tokio::fs::File::from_std(opened.stdin)),
                    stdout: tokio::fs::File::from_std(opened.stdout),
                    stderr: tokio::fs::File::from_std(opened.stderr),
                })),
            })
        })))
    }

    /// A process deleted without ever starting: its waiters learn it is gone.
    pub fn never_started(&self) {
        if self.pid() == 0 && self.exit.borrow().is_none() {
            self.stdin_closer.close_now();
            // `send_replace`: stored even while nobody waits (`send` would drop it).
            self.exit.send_replace(Some(Exit::now(LOST)));
        }
    }

    /// Copies one output stream from the guest until its end.
    fn pump_out(&self, to: tokio::fs::File, stderr: bool) -> JoinHandle<()> {
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        tokio::spawn(async move { pump_out(&agent, &c, &e, stderr, to).await })
    }

    fn pump_in(&self, mut from: tokio::fs::File) -> JoinHandle<()> {
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if agent.write_stdin(&c, &e, buf[..n].to_vec()).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = agent.close_stdin(&c, &e).await;
        })
    }
}

/// One output stream, until its end, an error, or an agent that answers with nothing over and
/// over ([`MAX_EMPTY_READS`]), which is a protocol violation.
async fn pump_out(agent: &Agent, c: &str, e: &str, stderr: bool, mut to: tokio::fs::File) {
    let call = if stderr { "ReadStderr" } else { "ReadStdout" };
    let mut empty = EmptyReads::default();
    loop {
        match agent.read(c, e, stderr, READ_CHUNK).await {
            Ok(read) if !empty.allow(agent, call, &read) => break,
            Ok(Read::Data(data)) => {
                if to.write_all(&data).await.is_err() {
                    break;
                }
            }
            Ok(Read::Empty) => {}
            Ok(Read::Eof) | Err(_) => break,
        }
    }
    let _ = to.flush().await;
}

#[async_trait]
impl Process for VmProcess {
    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    async fn start(&self) -> Result<u32> {
        let Some(pumps) = self.pumps.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(Error::FailedPrecondition(format!(
                "process {:?} of {} was already started",
                self.exec_id, self.container_id
            )));
        };
        // Output pumps first: they long-poll, so nothing the process prints early is missed.
        let mut outputs = vec![self.pump_out(pumps.stdout, false)];
        if !self.terminal {
            outputs.push(self.pump_out(pumps.stderr, true));
        }
        let stdin = pumps.stdin.map(|f| self.pump_in(f));
        let pid = match self.agent.start(&self.container_id, &self.exec_id).await {
            Ok(pid) => pid,
            Err(e) => {
                for h in &outputs {
                    h.abort();
                }
                if let Some(h) = stdin {
                    h.abort();
                }
                return Err(e.into());
            }
        };
        self.pid.store(pid, Ordering::SeqCst);
        let agent = self.agent.clone();
        let (c, e) = (self.container_id.clone(), self.exec_id.clone());
        let exit = self.exit.clone();
        let closer = self.stdin_closer.clone();
        let ooms = self.ooms.clone();
        tokio::spawn(async move {
            let status = match agent.wait(&c, &e).await {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(container = %c, exec = %e, error = %err, "lost the process with its VM");
                    LOST
                }
            };
            let at = std::time::SystemTime::now();
            if status == LOST {
                ooms.report(&c).await;
            }
            let aborts: Vec<_> = outputs.iter().map(JoinHandle::abort_handle).collect();
            let drain = async {
                for h in outputs {
                    let _ = h.await;
                }
            };
            if tokio::time::timeout(OUTPUT_DRAIN, drain).await.is_err() {
                tracing::warn!(container = %c, exec = %e, "output still open after exit; cut off");
                for a in aborts {
                    a.abort();
                }
            }
            if let Some(h) = stdin {
                h.abort();
            }
            closer.close_now();
            exit.send_replace(Some(Exit { status, at }));
        });
        Ok(pid)
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::now(LOST);
            }
        }
    }

    async fn kill(&self, signal: u32) -> Result<()> {
        Ok(self
            .agent
            .signal(&self.container_id, &self.exec_id, signal, false)
            .await?)
    }

    async fn resize_pty(&self, width: u32, height: u32) -> Result<()> {
        Ok(self
            .agent
            .resize(&self.container_id, &self.exec_id, width, height)
            .await?)
    }

    async fn close_stdin(&self) -> Result<()> {
        // The pipe's end of file ends the stdin pump, which closes the guest's stdin.
        self.stdin_closer.close();
        Ok(())
    }
}
