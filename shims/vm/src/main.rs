//! containerd-shim-yard-vm-v1 (being built).

fn main() {}
