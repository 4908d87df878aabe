//! A bundle's config.json as every shim reads it (the shim kit's parser into oci-spec's Spec).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = yard_shim_kit::bundle::parse_json::<oci_spec::runtime::Spec>(data, "config.json");
});
