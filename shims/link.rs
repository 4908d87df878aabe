//! Build script of the shims: how a release build for x86_64 Linux (GNU), linked by lld (rustc's
//! default there), links a shim's binary. Other builds link as before.
//!
//! - With packed relative relocations (`-z pack-relative-relocs`, glibc 2.36 or later at run
//!   time): the loader reads a `.relr.dyn` of kilobytes where `.rela.dyn` held 0.7-1.4 MB, which
//!   every shim process kept resident.
//! - With the crate's `hot-symbols.txt`, if it has one (written by `scripts/hot-symbols`), as
//!   lld's symbol ordering file: the functions the shim runs to start, serve a task and idle then
//!   lie together at the start of its text, so an idle shim keeps about that much text resident,
//!   not every 128 KiB window of it that one of them sits in. Names the binary no longer has
//!   (after a dependency or toolchain upgrade) are skipped.
//!
//! docs/performance.md, "What a shim's memory is made of".

#![allow(
    clippy::print_stdout,
    reason = "cargo reads a build script's instructions from its stdout"
)]

use std::path::Path;

fn main() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("hot-symbols.txt");
    // (Watching a path that does not exist would rerun this script, and relink, every build.)
    let watched = if order.is_file() {
        "hot-symbols.txt"
    } else {
        "Cargo.toml"
    };
    println!("cargo::rerun-if-changed={watched}");
    if var("PROFILE") != "release" || var("TARGET") != "x86_64-unknown-linux-gnu" {
        return;
    }
    println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    if order.is_file() {
        println!(
            "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
