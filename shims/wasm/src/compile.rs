//! Compiling, in the parent: a module is read (within the size cap), compiled with the
//! worker's engine configuration or taken from the on-disk cache, and handed to the worker as an
//! artifact. Compiling runs no guest code, so the privileged parent may do it; keeping the cache
//! out of the worker's reach means a compromised worker cannot plant native code that other
//! tasks would load.

use std::io::Read;
use std::path::Path;

use wasmtime::component::Component;
use wasmtime::{Engine, Module};
use yard_shim_kit::{Error, Result};

use crate::cache;
use crate::config::Options;

/// What a Wasm binary's header says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Module,
    Component,
}

impl Kind {
    pub fn detect(bytes: &[u8]) -> Option<Kind> {
        match bytes.get(..8)? {
            [0, b'a', b's', b'm', 1, 0, 0, 0] => Some(Kind::Module),
            [0, b'a', b's', b'm', _, _, 1, 0] => Some(Kind::Component),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Module => "module",
            Kind::Component => "component",
        }
    }
}

/// A module read from a task's root: its bytes, kind and digest.
pub struct Source {
    pub bytes: Vec<u8>,
    pub kind: Kind,
    pub digest: String,
}

pub struct Compiler {
    engine: Engine,
    options: Options,
}

impl Compiler {
    /// The compiling engine, and the cache directory checked (created if missing).
    pub fn new(options: Options) -> Result<Compiler> {
        cache::check_dir(&options.cache_dir).map_err(|e| {
            Error::FailedPrecondition(format!(
                "options: cache_dir: {e} (the compiled-code cache must be root's alone)"
            ))
        })?;
        let engine = Engine::new(&crate::runtime::engine_config(&options, false))
            .map_err(|e| Error::Internal(format!("wasmtime engine: {e}")))?;
        Ok(Compiler { engine, options })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Read the Wasm binary at `path` (refused past `max_module_mib`). `what` names it in
    /// errors (`process.args[0] /app.wasm`).
    pub fn read(&self, path: &Path, what: &str) -> Result<Source> {
        let max = self.options.max_module_bytes();
        let file = std::fs::File::open(path)
            .map_err(|e| Error::InvalidArgument(format!("{what}: cannot read it: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| Error::InvalidArgument(format!("{what}: cannot read it: {e}")))?
            .len();
        let too_big = |size: u64| {
            Error::InvalidArgument(format!(
                "{what}: {size} bytes is over the runtime's module size limit of {} MiB \
                 (option max_module_mib)",
                self.options.max_module_mib
            ))
        };
        if size > max {
            return Err(too_big(size));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // A file that grows while it is read is cut at the limit.
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::InvalidArgument(format!("{what}: cannot read it: {e}")))?;
        if bytes.len() as u64 > max {
            return Err(too_big(bytes.len() as u64));
        }
        let kind = Kind::detect(&bytes).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: not a WebAssembly binary (no \\0asm header or unknown version)"
            ))
        })?;
        let digest = cache::digest(&bytes);
        Ok(Source {
            bytes,
            kind,
            digest,
        })
    }

    /// The compiled artifact: from the cache if a sound entry is there, else compiled now (and
    /// cached for next time). CPU work, for a blocking thread.
    pub fn artifact(&self, src: &Source, what: &str) -> Result<Vec<u8>> {
        let entry = cache::entry(
            &self.options.cache_dir,
            &src.digest,
            &self.engine,
            src.kind.name(),
        );
        if let Some(artifact) = cache::load(&entry) {
            tracing::debug!(path = %entry.path.display(), kind = src.kind.name(), "loaded from cache");
            return Ok(artifact);
        }
        let t = std::time::Instant::now();
        let invalid = |e: wasmtime::Error| {
            Error::InvalidArgument(format!("{what}: invalid {}: {e:#}", src.kind.name()))
        };
        let artifact = match src.kind {
            Kind::Module => Module::new(&self.engine, &src.bytes)
                .map_err(invalid)?
                .serialize(),
            Kind::Component => Component::new(&self.engine, &src.bytes)
                .map_err(invalid)?
                .serialize(),
        }
        .map_err(|e| Error::Internal(format!("{what}: serialize the compiled code: {e}")))?;
        tracing::info!(
            what,
            kind = src.kind.name(),
            ms = t.elapsed().as_millis() as u64,
            "compiled"
        );
        cache::store(&entry, &artifact);
        Ok(artifact)
    }

    /// Forget a cache entry the worker could not load (another engine's, or damaged beyond
    /// what the checksum sees).
    pub fn discard(&self, src: &Source) {
        cache::discard(&cache::entry(
            &self.options.cache_dir,
            &src.digest,
            &self.engine,
            src.kind.name(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(module (memory 1) (func (export "_start")))`
    pub const START: &[u8] = &[
        0, 0x61, 0x73, 0x6d, 1, 0, 0, 0, // header
        1, 4, 1, 0x60, 0, 0, // type: [] -> []
        3, 2, 1, 0, // func 0: type 0
        5, 3, 1, 0, 1, // memory: min 1
        7, 10, 1, 6, b'_', b's', b't', b'a', b'r', b't', 0, 0, // export "_start" func 0
        10, 4, 1, 2, 0, 0x0b, // code: no locals, end
    ];

    #[test]
    fn detects_modules_and_components() {
        assert_eq!(Kind::detect(b"\0asm\x01\0\0\0rest"), Some(Kind::Module));
        assert_eq!(Kind::detect(b"\0asm\x0d\0\x01\0"), Some(Kind::Component));
        assert_eq!(Kind::detect(b"\x7fELF\x02\x01\x01\0"), None);
        assert_eq!(Kind::detect(b"\0asm"), None);
    }

    /// The parent compiles without the pooling allocator; the worker's pooling engine must load
    /// the result.
    #[test]
    fn artifacts_compiled_without_pooling_load_with_it() {
        let o = Options {
            max_instances: 4,
            ..Options::default()
        };
        let compile = Engine::new(&crate::runtime::engine_config(&o, false))
            .unwrap_or_else(|e| panic!("{e}"));
        let run =
            Engine::new(&crate::runtime::engine_config(&o, true)).unwrap_or_else(|e| panic!("{e}"));
        let artifact = Module::new(&compile, START)
            .and_then(|m| m.serialize())
            .unwrap_or_else(|e| panic!("{e}"));
        let m = crate::sys::deserialize_module(&run, &artifact).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.get_export("_start").is_some());
    }

    #[test]
    fn modules_over_the_size_cap_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let o = Options {
            max_module_mib: 1,
            cache_dir: dir.path().join("cache"),
            ..Options::default()
        };
        let c = Compiler {
            engine: Engine::new(&crate::runtime::engine_config(&o, false))
                .unwrap_or_else(|e| panic!("{e}")),
            options: o,
        };
        let big = dir.path().join("big.wasm");
        let f = std::fs::File::create(&big).unwrap_or_else(|e| panic!("{e}"));
        f.set_len((1 << 20) + 1).unwrap_or_else(|e| panic!("{e}"));
        let e = c
            .read(&big, "process.args[0] /big.wasm")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            e,
            "process.args[0] /big.wasm: 1048577 bytes is over the runtime's module size limit \
             of 1 MiB (option max_module_mib)"
        );
        let ok = dir.path().join("ok.wasm");
        std::fs::write(&ok, START).unwrap_or_else(|e| panic!("{e}"));
        let src = c.read(&ok, "ok").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(src.kind, Kind::Module);
    }
}
