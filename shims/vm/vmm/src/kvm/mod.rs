//! One owning type per KVM object: [`vm::KvmVm`] (the VM file descriptor, with its irqchip,
//! PIT, irqfds and ioeventfds), [`vcpu::Vcpu`] (a vCPU and its run loop kick), and
//! [`memory::GuestRam`] (guest RAM with guard pages). `unsafe` for KVM and mmap stays here.

pub mod memory;
pub mod vcpu;
pub mod vm;

pub use memory::{GuestRam, GuestRamError};
pub use vcpu::Vcpu;
pub use vm::KvmVm;
