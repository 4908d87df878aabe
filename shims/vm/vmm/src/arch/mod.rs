//! x86_64 boot (owned by the arch work).
