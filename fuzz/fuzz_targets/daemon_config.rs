//! switchyardd's TOML configuration, laid over the embedded default and validated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = switchyardd::config::Config::parse(text, "fuzz.toml");
    }
});
