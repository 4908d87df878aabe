//! The built-in VMM's virtio-net TX chain parsing: descriptor chains from a hostile guest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yard_vmm::fuzzing::virtio_net_tx(data));
