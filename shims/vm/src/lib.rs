//! containerd-shim-yard-vm-v1 as a library: the kit engine that maps the task API onto the
//! guest agent (`engine`, `agent`), the runtime's options, the hypervisor layer (a backend
//! trait and its factory, the QEMU backend and the built-in KVM backend on `yard-vmm`), host
//! virtualization detection and backend choice, and the rootfs image cache. With the `testing`
//! feature, a fake VMM and guest agent for tests without root, KVM or QEMU (`testing`).

pub mod agent;
pub mod builtin;
pub mod config;
pub mod engine;
pub mod hypervisor;
pub mod image;
pub mod info;
pub mod qemu;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod virt;

mod sys;
