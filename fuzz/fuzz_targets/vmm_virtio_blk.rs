//! The built-in VMM's virtio-blk request parsing: descriptor chains from a hostile guest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yard_vmm::fuzzing::virtio_blk(data));
