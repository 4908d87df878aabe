//! How errors leave the daemon: every domain error says which [`Kind`] it is, and this module is
//! the one place that turns a kind into a gRPC or ttrpc status code. containerd's clients (and
//! their retry and cleanup logic) branch on those codes, so they are tested here.

use std::error::Error as StdError;

/// The containerd error class (`errdefs`) of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    Unimplemented,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

/// Implemented by every error that can reach an RPC boundary.
pub trait Classify: StdError {
    fn kind(&self) -> Kind;
}

pub use switchyard_base::chain;

/// gRPC code for a kind.
pub fn grpc_code(kind: Kind) -> tonic::Code {
    match kind {
        Kind::NotFound => tonic::Code::NotFound,
        Kind::AlreadyExists => tonic::Code::AlreadyExists,
        Kind::InvalidArgument => tonic::Code::InvalidArgument,
        Kind::FailedPrecondition => tonic::Code::FailedPrecondition,
        Kind::Unimplemented => tonic::Code::Unimplemented,
        Kind::Unavailable => tonic::Code::Unavailable,
        Kind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Kind::Internal => tonic::Code::Internal,
    }
}

/// Kind of a ttrpc (or gRPC: the numbers are the same) status code received from a peer.
pub fn kind_of_code(code: i32) -> Kind {
    match code {
        5 => Kind::NotFound,
        6 => Kind::AlreadyExists,
        3 => Kind::InvalidArgument,
        9 => Kind::FailedPrecondition,
        12 => Kind::Unimplemented,
        14 => Kind::Unavailable,
        4 => Kind::DeadlineExceeded,
        _ => Kind::Internal,
    }
}

/// ttrpc code for a kind.
pub fn ttrpc_code(kind: Kind) -> ttrpc::Code {
    match kind {
        Kind::NotFound => ttrpc::Code::NOT_FOUND,
        Kind::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
        Kind::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
        Kind::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
        Kind::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
        Kind::Unavailable => ttrpc::Code::UNAVAILABLE,
        Kind::DeadlineExceeded => ttrpc::Code::DEADLINE_EXCEEDED,
        Kind::Internal => ttrpc::Code::INTERNAL,
    }
}

/// The gRPC status for an error: its kind's code and its whole chain as the message.
pub fn status<E: Classify + 'static>(err: E) -> tonic::Status {
    let code = grpc_code(err.kind());
    let msg = chain(&err);
    if code == tonic::Code::Internal {
        tracing::error!(error = %msg, "internal error");
    }
    tonic::Status::new(code, msg)
}

/// A failure with just a kind and a message, for checks done right at the RPC edge.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Simple {
    pub kind: Kind,
    pub message: String,
}

impl Simple {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl Classify for Simple {
    fn kind(&self) -> Kind {
        self.kind
    }
}

impl Classify for crate::ident::InvalidIdent {
    fn kind(&self) -> Kind {
        Kind::InvalidArgument
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_joins_sources() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }

    #[test]
    fn kinds_map_to_containerd_codes_both_ways() {
        let all = [
            (Kind::NotFound, tonic::Code::NotFound),
            (Kind::AlreadyExists, tonic::Code::AlreadyExists),
            (Kind::InvalidArgument, tonic::Code::InvalidArgument),
            (Kind::FailedPrecondition, tonic::Code::FailedPrecondition),
            (Kind::Unimplemented, tonic::Code::Unimplemented),
            (Kind::Unavailable, tonic::Code::Unavailable),
            (Kind::DeadlineExceeded, tonic::Code::DeadlineExceeded),
            (Kind::Internal, tonic::Code::Internal),
        ];
        for (kind, code) in all {
            assert_eq!(grpc_code(kind), code);
            assert_eq!(kind_of_code(code as i32), kind);
            assert_eq!(ttrpc_code(kind) as i32, code as i32);
        }
        let st = status(Simple::new(Kind::NotFound, "container \"x\": not found"));
        assert_eq!(st.code(), tonic::Code::NotFound);
        assert_eq!(st.message(), "container \"x\": not found");
    }
}
