//! KVM objects (owned by the kvm work).
