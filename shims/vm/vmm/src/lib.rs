//! Switchyard's built-in VMM: a minimal, firecracker-class virtual machine monitor on the rust-vmm
//! crates that the vm shim runs in-process (no QEMU process) where `/dev/kvm` has hardware
//! virtualization.
//!
//! - [`layout`]: the guest physical memory map, IRQ numbers and port numbers.
//! - [`bus`]: port-I/O and MMIO buses that route a vCPU exit to a device.
//! - [`kvm`]: one owning type per KVM object (VM, vCPU), guest memory with guard pages.
//! - [`arch`]: x86_64 boot: kernel load, zero page and e820, GDT, identity page tables, CPUID,
//!   MSRs, FPU, LAPIC, MP table.
//! - [`devices`]: 8250 serial, i8042 (reset), the boot timer, and virtio-mmio devices (block,
//!   vsock with firecracker's hybrid-vsock Unix socket host side).
//! - [`seccomp`]: the per-thread seccomp filters of the vCPU, control and device threads.
//! - `fuzzing` (the `fuzzing` feature): the fuzz targets' harnesses over the device models.
//! - [`vmm`]: assembles a VM from a [`vmm::VmmConfig`], runs one thread per vCPU and the device
//!   event loops, and tears everything down on shutdown, guest reboot, panic or drop.

// A silent truncation of a guest-controlled value is a bug here: every cast is proven lossless
// (`From`/`try_from`) or says why it cannot lose anything. Per-crate lint levels cannot go in the
// root manifest, so they are here.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod arch;
pub mod bus;
pub mod devices;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod irq;
pub mod kvm;
pub mod layout;
pub mod seccomp;
pub mod vmm;

/// Guest memory as every module sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
