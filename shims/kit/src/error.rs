//! One error type for shims, and its one mapping to ttrpc status codes.

use containerd_shim_protos::ttrpc;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the caller: a malformed spec, an unknown field value. Names the field.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The call is valid but the task is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// This server cannot take the call, another one can: a Create reaching a shim that is
    /// exiting (the caller starts a new shim).
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Unavailable(_) => ttrpc::Code::UNAVAILABLE,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ttrpc::Code::NOT_FOUND
            }
            Error::Io { .. } | Error::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

pub use switchyard_base::chain;

/// A ttrpc error for a method this shim does not serve.
pub fn unimplemented(method: &str) -> ttrpc::Error {
    Error::Unimplemented(format!("{method} is not implemented by this shim")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            Error::InvalidArgument("x".into()).code(),
            ttrpc::Code::INVALID_ARGUMENT
        );
        let e = Error::io("open config.json")(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.code(), ttrpc::Code::NOT_FOUND);
        assert!(e.to_string().starts_with("open config.json: "));
        match ttrpc::Error::from(Error::Unimplemented("Checkpoint".into())) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert_eq!(s.message(), "Checkpoint");
            }
            other => panic!("{other:?}"),
        }
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("attach a disk")]
        Wrapped(#[source] Error),
    }

    #[test]
    fn chain_joins_sources_once() {
        let inner = Error::io("open img")(std::io::Error::from(std::io::ErrorKind::NotFound));
        // Error::Io prints its source and returns it too: it appears once.
        let e = Outer::Wrapped(inner);
        let text = chain(&e);
        assert!(text.starts_with("attach a disk: open img: "), "{text}");
        assert_eq!(text.matches("not found").count(), 1, "{text}");
    }
}
