//! Build script of the shims: how a release build for x86_64 Linux (GNU), linked by lld (rustc's
//! default there), links a shim's binary. Other builds link as before.
//!
//! - With packed relative relocations (`-z pack-relative-relocs`, glibc 2.36 or later at run
//!   time): the loader reads a `.relr.dyn` of kilobytes where `.rela.dyn` held 0.7-1.4 MB, which
//!   every shim process kept resident (docs/performance.md, "What a shim's memory is made of").

#![allow(
    clippy::print_stdout,
    reason = "cargo reads a build script's instructions from its stdout"
)]

fn main() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    println!("cargo::rerun-if-changed=Cargo.toml");
    if var("PROFILE") != "release" || var("TARGET") != "x86_64-unknown-linux-gnu" {
        return;
    }
    println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
