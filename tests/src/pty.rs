//! A command run on a pseudo-terminal the test owns, as a user at a terminal runs it: its
//! stdin, stdout and stderr are the terminal, the test types into it, reads what it shows,
//! and resizes it (the window size set on the terminal, then SIGWINCH to the command).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::pty::{Winsize, openpty};

/// A child on a pseudo-terminal, killed when dropped.
pub struct PtyChild {
    master: File,
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl PtyChild {
    /// Spawns `cmd` on a new terminal of `cols` x `rows`.
    pub fn spawn(cmd: &mut Command, (cols, rows): (u16, u16)) -> PtyChild {
        let pty = openpty(&winsize(cols, rows), None).expect("openpty");
        let io = |what| Stdio::from(pty.slave.try_clone().expect(what));
        let child = cmd
            .stdin(io("pty stdin"))
            .stdout(io("pty stdout"))
            .stderr(io("pty stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        // Only the child holds the terminal now: the reader sees EIO once the child is gone.
        drop(pty.slave);
        // The Command keeps its copies of the terminal until it is changed.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let master = File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let mut master = master.try_clone().expect("pty master");
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = master.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        PtyChild {
            master,
            child,
            output,
            reader: Some(reader),
        }
    }

    /// Types `data`.
    pub fn write(&mut self, data: &[u8]) {
        self.master.write_all(data).expect("write to the pty");
    }

    /// Everything the terminal showed so far.
    pub fn output(&self) -> String {
        crate::text(&self.output.lock().unwrap())
    }

    /// Sets the terminal's size and tells the child (SIGWINCH), as a terminal emulator does.
    pub fn resize(&self, cols: u16, rows: u16) {
        let ws = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(self.master.as_fd(), ws).expect("TIOCSWINSZ");
        self.signal(nix::sys::signal::Signal::SIGWINCH);
    }

    /// Sends the child `signal`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("{signal}: {e}"));
    }

    /// Whether the terminal is in canonical mode with echo (as a shell leaves it, and as a
    /// program that put it in raw mode must leave it).
    pub fn is_cooked(&self) -> bool {
        use rustix::termios::LocalModes;
        let t = rustix::termios::tcgetattr(self.master.as_fd()).expect("tcgetattr");
        t.local_modes
            .contains(LocalModes::ICANON | LocalModes::ECHO)
    }

    /// Waits for the child to exit (killed after `timeout`, which fails the test) and for
    /// its last output; its status and everything it showed.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let exited = crate::eventually(timeout, || self.child.try_wait().ok().flatten().is_some());
        if !exited {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait");
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let out = self.output();
        assert!(
            exited,
            "did not exit within {timeout:?}; it showed: {out:?}"
        );
        (status, out)
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
