//! Resource limits a process sets on itself.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, as the Go runtime does for
/// every program at start (containerd and its shims). A login shell's soft limit of 1,024 would
/// otherwise bound what holds a descriptor per container or task far below what the hard limit
/// allows. Returns the limit as it was when it was raised, `None` when the soft limit was the
/// hard one already.
pub fn raise_nofile_limit() -> std::io::Result<Option<Rlimit>> {
    let limit = getrlimit(Resource::Nofile);
    // The soft limit is never above the hard one.
    if limit.current == limit.maximum {
        return Ok(None);
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!(
                "raise the soft RLIMIT_NOFILE {:?} to the hard limit {:?}: {e}",
                limit.current, limit.maximum
            ),
        )
    })?;
    Ok(Some(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a child of its own (the limit is the process's): from a lowered soft limit the raise
    /// reaches the hard one and reports what it was; a second raise has nothing to do.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let me = std::env::current_exe().expect("own path");
        if std::env::var_os("SWITCHYARD_BASE_RLIMIT_CHILD").is_some() {
            let hard = getrlimit(Resource::Nofile).maximum;
            let low = Rlimit {
                current: Some(64),
                maximum: hard,
            };
            setrlimit(Resource::Nofile, low).expect("lower the soft limit");
            let was = raise_nofile_limit().expect("raise");
            assert_eq!(was.map(|l| l.current), Some(Some(64)));
            assert_eq!(getrlimit(Resource::Nofile).current, hard);
            assert!(raise_nofile_limit().expect("raise again").is_none());
            return;
        }
        let out = std::process::Command::new(me)
            .args([
                "--exact",
                "limits::tests::the_soft_limit_is_raised_to_the_hard_one",
                "--nocapture",
            ])
            .env("SWITCHYARD_BASE_RLIMIT_CHILD", "1")
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child: {text}");
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
    }
}
