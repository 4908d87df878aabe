//! Architecture-specific boot: how the guest finds its kernel, memory map and CPUs, and the
//! state each vCPU starts in. Only x86_64 so far.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
