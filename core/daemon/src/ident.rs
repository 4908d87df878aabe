//! containerd's identifier rule (one home: `switchyard_base::ident`), used for namespaces,
//! container ids, lease ids and runtime names.

pub use switchyard_base::ident::{InvalidIdent, MAX_LEN, check, is_valid};
