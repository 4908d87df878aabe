//! The built-in VMM's virtio-vsock packet parsing and connection handling.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yard_vmm::fuzzing::virtio_vsock(data));
