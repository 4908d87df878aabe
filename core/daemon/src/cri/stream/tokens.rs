//! One-time tokens: a CRI request kept until its client connects, as containerd's request
//! cache keeps it (random token, one use, a minute to live, a bounded number in flight).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use switchyard_api::cri::v1 as cri;
use tonic::Status;

/// How long a URL stays usable.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Requests waiting for their client at once (containerd's `maxInFlight`).
const MAX_IN_FLIGHT: usize = 1000;

/// A request waiting for its client.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

impl Pending {
    /// The URL path's first part for this request.
    pub fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown or already used streaming token")]
    Unknown,
    #[error("the streaming token expired (tokens live {}s)", TOKEN_TTL.as_secs())]
    Expired,
}

#[derive(Default)]
pub struct Tokens {
    map: Mutex<HashMap<String, (Pending, Instant)>>,
}

impl Tokens {
    /// Keep `pending` behind a new token.
    pub fn insert(&self, pending: Pending) -> Result<String, Status> {
        self.insert_at(pending, Instant::now())
    }

    fn insert_at(&self, pending: Pending, now: Instant) -> Result<String, Status> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (_, at)| now.saturating_duration_since(*at) < TOKEN_TTL);
        if map.len() >= MAX_IN_FLIGHT {
            return Err(Status::resource_exhausted(format!(
                "{MAX_IN_FLIGHT} streaming requests are waiting for their clients already"
            )));
        }
        // 16 random bytes (a v4 UUID's randomness comes from the OS), URL-safe.
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(uuid::Uuid::new_v4().as_bytes());
        map.insert(token.clone(), (pending, now));
        Ok(token)
    }

    /// The request behind `token`, which is then forgotten.
    pub fn take(&self, token: &str) -> Result<Pending, TokenError> {
        self.take_at(token, Instant::now())
    }

    fn take_at(&self, token: &str, now: Instant) -> Result<Pending, TokenError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (pending, at) = map.remove(token).ok_or(TokenError::Unknown)?;
        if now.saturating_duration_since(at) >= TOKEN_TTL {
            return Err(TokenError::Expired);
        }
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Pending {
        Pending::Exec(cri::ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
    }

    #[test]
    fn a_token_works_once_and_expires() {
        let t = Tokens::default();
        let now = Instant::now();
        let a = t.insert_at(exec(), now).unwrap();
        let b = t.insert_at(exec(), now).unwrap();
        assert_ne!(a, b);
        assert!(a.len() >= 22 && !a.contains('/'), "{a}");
        assert!(matches!(t.take_at(&a, now), Ok(Pending::Exec(_))));
        assert_eq!(t.take_at(&a, now).unwrap_err(), TokenError::Unknown);
        assert_eq!(
            t.take_at(&b, now + TOKEN_TTL).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(t.take_at("", now).unwrap_err(), TokenError::Unknown);
    }

    #[test]
    fn tokens_in_flight_are_bounded_and_expired_ones_make_room() {
        let t = Tokens::default();
        let now = Instant::now();
        for _ in 0..MAX_IN_FLIGHT {
            t.insert_at(exec(), now).unwrap();
        }
        let full = t.insert_at(exec(), now).unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        assert!(t.insert_at(exec(), now + TOKEN_TTL).is_ok());
    }
}
