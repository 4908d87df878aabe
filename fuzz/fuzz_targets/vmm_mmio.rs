//! The built-in VMM's virtio-mmio register accesses (and the device activation they drive).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yard_vmm::fuzzing::mmio(data));
