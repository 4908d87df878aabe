//! VM assembly (owned by the kvm work).
