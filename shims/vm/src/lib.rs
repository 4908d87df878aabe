//! containerd-shim-yard-vm-v1 as a library: the kit engine that maps the task API onto the
//! guest agent (`engine`, `agent`), the runtime's options, the hypervisor layer (a backend trait
//! and its QEMU backend), host virtualization detection, and the rootfs image cache.

pub mod agent;
pub mod config;
pub mod engine;
pub mod hypervisor;
pub mod image;
pub mod info;
pub mod qemu;
pub mod virt;

mod sys;
