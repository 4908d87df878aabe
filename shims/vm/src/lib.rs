//! containerd-shim-yard-vm-v1 as a library: the kit engine that maps the task API onto the
//! guest agent (`engine`, `agent`), the runtime's options, the hypervisor layer (a backend
//! trait, its QEMU backend and the built-in KVM backend on `yard-vmm`), host virtualization
//! detection and backend choice, and the rootfs image cache.

pub mod agent;
pub mod builtin;
pub mod config;
pub mod engine;
pub mod hypervisor;
pub mod image;
pub mod info;
pub mod qemu;
pub mod virt;

mod sys;
