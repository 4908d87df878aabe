//! The one unsafe operation of the Wasm shim: turning a cached artifact back into executable
//! code.

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Load a precompiled core module.
pub fn deserialize_module(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Module> {
    // SAFETY: wasmtime requires the bytes to come from `Module::serialize` of a compatible engine
    // and not to have been tampered with. The artifact was produced by this shim, and
    // `cache::load` verified its SHA-256 checksum before handing it over; wasmtime itself checks
    // the version and configuration header and refuses a mismatch.
    unsafe { Module::deserialize(engine, artifact) }
}

/// Load a precompiled component.
pub fn deserialize_component(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: as for `deserialize_module`: our own artifact, checksum verified by `cache::load`,
    // version and configuration checked by wasmtime.
    unsafe { Component::deserialize(engine, artifact) }
}
