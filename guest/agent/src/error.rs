//! The agent's error: every error says its kind, and the one mapping to ttrpc status codes lives
//! here (the vm shim turns them back into containerd's codes).

use yard_agent_protocol::ttrpc::{self, Code};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A malformed request or spec; the message starts with the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the object's state (start twice, exec in a stopped container).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A system call or file operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `map_err(Error::io("mount /proc"))`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// Like [`Error::io`] for rustix/nix errnos.
    pub fn errno<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
        let what = what.into();
        move |e| Error::Io {
            what,
            source: e.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Io { .. } | Error::Internal(_) => Code::INTERNAL,
        }
    }
}

pub use switchyard_base::chain;

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code.enum_value_or_default(), s.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn kinds_map_to_ttrpc_codes() {
        let cases = [
            (Error::NotFound("c".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("c".into()), Code::ALREADY_EXISTS),
            (Error::InvalidArgument("f".into()), Code::INVALID_ARGUMENT),
            (
                Error::FailedPrecondition("p".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::Internal("i".into()), Code::INTERNAL),
        ];
        for (e, code) in cases {
            assert_eq!(status(e).0, code);
        }
    }

    #[test]
    fn io_errors_are_internal_and_print_their_cause() {
        let e = Error::io("mount /proc")(std::io::Error::from_raw_os_error(libc::EPERM));
        let (code, msg) = status(e);
        assert_eq!(code, Code::INTERNAL);
        assert!(msg.starts_with("mount /proc: "), "{msg}");
    }
}
