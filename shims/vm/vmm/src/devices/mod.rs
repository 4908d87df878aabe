//! Emulated devices: legacy port-I/O devices (8250 serial, i8042, the boot timer) and the
//! virtio-mmio transport with its devices (block, vsock).
//!
//! Device models never trust the guest: every guest-controlled value is checked, errors become
//! device status codes or ignored accesses, and anything the guest can make us log goes through
//! [`ratelimit::LogLimiter`].

pub mod boot_timer;
pub mod i8042;
pub mod ratelimit;
pub mod serial;
pub mod virtio;
