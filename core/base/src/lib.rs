//! What every Switchyard binary needs once, with no dependency but rustix (the daemon, `yard`,
//! the shims and the static guest agent all link it):
//!
//! - [`chain`]: an error and its causes as one line, `a: b: c`;
//! - [`cgroup`]: this process's own cgroups, and the lock every cgroup migration takes;
//! - [`group`]: which tasks share one shim process;
//! - [`ident`]: containerd's identifier rule for namespaces, container, exec and lease ids;
//! - [`limits`]: the soft descriptor limit raised to the hard one, as Go programs do;
//! - [`mount`]: which of a spec's mounts are bind mounts;
//! - [`socket`]: a socket file whose server is gone, removed;
//! - [`ttrpc`]: what ttrpc's untyped errors mean (a connection gone, a deadline passed);
//! - [`exit_with`]: what a binary does with an error at its edge (`error: a: b: c` on stderr and a
//!   non-zero status; never a backtrace, whatever `RUST_BACKTRACE` says).

pub mod cgroup;
pub mod gate;
pub mod group;
pub mod ident;
pub mod limits;
pub mod mount;
pub mod oci_defaults;
pub mod socket;
pub mod ttrpc;

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;

/// An error and its sources as `a: b: c`.
///
/// A message should not repeat its cause (the cause is printed here), but some errors from other
/// crates do (`{context}: {source}` with the source also returned); a source whose text already
/// ends what has been printed is therefore skipped, so no cause ever appears twice in a row.
pub fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() && !out.ends_with(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// The edge of a binary: prints `error: a: b: c` to stderr and returns a failing exit code.
/// `main` returns this instead of an `anyhow::Result`, whose `Debug` form prints a backtrace
/// under `RUST_BACKTRACE=1`.
pub fn exit_with(err: &dyn Error) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "error: {}", chain(err));
    ExitCode::FAILURE
}

/// [`exit_with`] for a result: success is `ExitCode::SUCCESS`.
pub fn exit_code<E: AsRef<dyn Error + Send + Sync>>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_with(e.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    fn e(parts: &[&'static str]) -> E {
        let mut it = parts.iter().rev();
        let mut cur = E(it.next().copied().unwrap_or(""), None);
        for p in it {
            cur = E(p, Some(Box::new(cur)));
        }
        cur
    }

    #[test]
    fn joins_every_cause() {
        assert_eq!(chain(&e(&["a", "b", "c"])), "a: b: c");
        assert_eq!(chain(&e(&["only"])), "only");
    }

    #[test]
    fn a_cause_its_parent_already_printed_appears_once() {
        // `{context}: {source}` that also returns the source.
        let text = chain(&e(&["attach a disk", "open img: not found", "not found"]));
        assert_eq!(text, "attach a disk: open img: not found");
    }

    #[test]
    fn a_short_cause_inside_a_longer_message_still_prints() {
        // Only a suffix counts as already printed: "found" inside "not found here" does not.
        assert_eq!(
            chain(&e(&["not found here", "found"])),
            "not found here: found"
        );
    }

    #[test]
    fn empty_causes_are_skipped() {
        assert_eq!(chain(&e(&["a", "", "c"])), "a: c");
    }
}
