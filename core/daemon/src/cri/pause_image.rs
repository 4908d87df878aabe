//! The built-in `[cri] sandbox_image`, which switchyardd makes itself.
//!
//! A pod on a foreign runtime (runc) or with a pod-wide PID namespace gets a pause container,
//! whose image must be in the `k8s.io` store. When `sandbox_image` is the built-in default
//! ([`BUILT_IN`]) and the store lacks it, it is built here: `[cri] pause_binary` (the static
//! `yard-pause` that scripts/setup installs) as `/pause`, alone in one layer, for the store's
//! platform (`switchyard_images::build::pause_image`), and imported through the store's own
//! import, so it is verified, unpacked and recorded as any archive is. No registry, no network.
//! Any other `sandbox_image` is the operator's, pulled when missing (`containers.rs`).
//!
//! The binary is checked first, and nothing is written when it fails: it must be an ELF
//! executable for this machine with no interpreter and no shared libraries, because the image
//! holds nothing else. A dynamically linked build (`cargo build`'s glibc `yard-pause`) would
//! only fail later, at exec inside the runtime, with an error naming neither setting.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use object::Endianness;
use object::elf;
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _};
use switchyard_images::{ImageError, ImageStore, build, normalize};
use tonic::Status;

use super::{Cri, NAMESPACE};
use crate::error::{Classify, Kind, status};
use crate::server::blocking;

/// The default `[cri] sandbox_image` (config/default.toml), the one switchyardd builds.
pub const BUILT_IN: &str = "switchyard.local/pause:3.10";

/// Largest `pause_binary` read (`yard-pause` is well under 1 MiB).
const MAX_BINARY_BYTES: u64 = 64 << 20;

/// The default sandbox image could not be built.
#[derive(Debug, thiserror::Error)]
#[error(
    "[cri] sandbox_image {BUILT_IN:?} is not in the image store; building it from [cri] pause_binary {}",
    path.display()
)]
pub struct BuildError {
    path: PathBuf,
    #[source]
    cause: Cause,
}

#[derive(Debug, thiserror::Error)]
enum Cause {
    #[error("missing (scripts/setup builds and installs it)")]
    Missing,
    #[error("read it")]
    Read(#[source] std::io::Error),
    #[error("larger than {MAX_BINARY_BYTES} bytes")]
    TooLarge,
    #[error("it cannot run alone in an image")]
    NotStatic(#[source] ElfError),
    #[error("look the image up")]
    Store(#[source] ImageError),
    #[error("write the image")]
    Build(#[source] std::io::Error),
    #[error("import the image")]
    Import(#[source] ImageError),
}

impl Classify for BuildError {
    fn kind(&self) -> Kind {
        match self.cause {
            // The node is not set up for the default: the operator's to fix.
            Cause::Missing | Cause::Read(_) | Cause::TooLarge | Cause::NotStatic(_) => {
                Kind::FailedPrecondition
            }
            Cause::Store(_) | Cause::Build(_) | Cause::Import(_) => Kind::Internal,
        }
    }
}

/// Whether `image` names the built-in default.
pub fn is_built_in(image: &str) -> bool {
    normalize(image).is_ok_and(|n| normalize(BUILT_IN).is_ok_and(|b| n == b))
}

/// Makes sure `[cri] sandbox_image` is in the store when it is the built-in default, building it
/// from `[cri] pause_binary` when it is missing. Does nothing for any other image.
pub async fn ensure(cri: &Cri) -> Result<(), Status> {
    if !is_built_in(&cri.config.sandbox_image) {
        return Ok(());
    }
    let store = cri.shared.images.clone();
    let binary = cri.config.pause_binary.clone();
    blocking(move || {
        ensure_in(&store, &binary).map(|_| ()).map_err(|e| {
            tracing::warn!(error = %crate::error::chain(&e), "default sandbox image");
            status(e)
        })
    })
    .await
}

/// [`ensure`] on the store; `Ok(true)` when it built the image.
fn ensure_in(store: &ImageStore, binary: &Path) -> Result<bool, BuildError> {
    // One build at a time: a second pod waits and then finds the image.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(PoisonError::into_inner);
    let fail = |cause| BuildError {
        path: binary.to_owned(),
        cause,
    };
    match store.get(NAMESPACE, BUILT_IN) {
        Ok(_) => return Ok(false),
        Err(ImageError::NotFound { .. }) => {}
        Err(e) => return Err(fail(Cause::Store(e))),
    }
    let bytes = read_binary(binary).map_err(fail)?;
    check_static(&bytes).map_err(|e| fail(Cause::NotStatic(e)))?;
    let image = build::pause_image(bytes, store.platform()).map_err(|e| fail(Cause::Build(e)))?;
    let archive =
        build::oci_layout_tar(&[(BUILT_IN, &image)]).map_err(|e| fail(Cause::Build(e)))?;
    store
        .import(NAMESPACE, archive.as_slice(), None, &|_| {})
        .map_err(|e| fail(Cause::Import(e)))?;
    tracing::info!(
        image = BUILT_IN,
        binary = %binary.display(),
        digest = image.digest(),
        "built the default sandbox image"
    );
    Ok(true)
}

fn read_binary(path: &Path) -> Result<Vec<u8>, Cause> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Cause::Missing,
        _ => Cause::Read(e),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_BINARY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(Cause::Read)?;
    if bytes.len() as u64 > MAX_BINARY_BYTES {
        return Err(Cause::TooLarge);
    }
    Ok(bytes)
}

/// Why a file cannot run alone in an image on this machine.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit ELF file of this machine's byte order")]
    Format,
    #[error("built for ELF machine {found}, this machine is {expected}")]
    Machine { found: u16, expected: u16 },
    #[error("ELF type {0} is not an executable")]
    NotExecutable(u16),
    #[error("truncated or malformed ELF ({0})")]
    Malformed(&'static str),
    #[error(
        "dynamically linked (interpreter {0}); build it static, for x86_64-unknown-linux-musl, as scripts/setup does"
    )]
    Dynamic(String),
    #[error("it needs shared libraries; build it static, for x86_64-unknown-linux-musl")]
    NeedsLibraries,
    #[error("it has no loadable segment")]
    NoLoad,
}

/// The ELF `e_machine` of this machine, where known.
fn host_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(elf::EM_X86_64),
        "aarch64" => Some(elf::EM_AARCH64),
        "riscv64" => Some(elf::EM_RISCV),
        "powerpc64" => Some(elf::EM_PPC64),
        "s390x" => Some(elf::EM_S390),
        "loongarch64" => Some(elf::EM_LOONGARCH),
        _ => None,
    }
}

/// Checks that `bytes` is an ELF64 executable for this machine that the kernel can start
/// without a dynamic loader: no `PT_INTERP`, no `DT_NEEDED`, at least one `PT_LOAD` (a static
/// or static-pie binary, as Rust builds for musl). The `object` crate reads the file.
pub fn check_static(bytes: &[u8]) -> Result<(), ElfError> {
    if !bytes.starts_with(&elf::ELFMAG) {
        return Err(ElfError::NotElf);
    }
    let native = if cfg!(target_endian = "little") {
        elf::ELFDATA2LSB
    } else {
        elf::ELFDATA2MSB
    };
    if bytes.get(4) != Some(&elf::ELFCLASS64) || bytes.get(5) != Some(&native) {
        return Err(ElfError::Format);
    }
    let header =
        elf::FileHeader64::<Endianness>::parse(bytes).map_err(|_| ElfError::Malformed("header"))?;
    let endian = header.endian().map_err(|_| ElfError::Malformed("header"))?;
    let e_type = header.e_type(endian);
    if !matches!(e_type, elf::ET_EXEC | elf::ET_DYN) {
        return Err(ElfError::NotExecutable(e_type));
    }
    let machine = header.e_machine(endian);
    if let Some(expected) = host_machine()
        && machine != expected
    {
        return Err(ElfError::Machine {
            found: machine,
            expected,
        });
    }
    let phdrs = header
        .program_headers(endian, bytes)
        .map_err(|_| ElfError::Malformed("program headers"))?;
    let mut load = false;
    for ph in phdrs {
        match ph.p_type(endian) {
            elf::PT_LOAD => load = true,
            elf::PT_INTERP => {
                let name = ph
                    .interpreter(endian, bytes)
                    .ok()
                    .flatten()
                    .ok_or(ElfError::Malformed("interpreter"))?;
                return Err(ElfError::Dynamic(
                    String::from_utf8_lossy(name).into_owned(),
                ));
            }
            elf::PT_DYNAMIC => {
                let entries = ph
                    .dynamic(endian, bytes)
                    .ok()
                    .flatten()
                    .ok_or(ElfError::Malformed("dynamic section"))?;
                for d in entries {
                    match d.tag(endian) {
                        elf::DT_NULL => break,
                        elf::DT_NEEDED => return Err(ElfError::NeedsLibraries),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !load {
        return Err(ElfError::NoLoad);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 file of this machine's byte order: a header, `phdrs` (type, data placed after
    /// the headers) and their data.
    fn elf(e_type: u16, machine: u16, phdrs: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let le = cfg!(target_endian = "little");
        let u16b = |v: u16| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let u32b = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let u64b = |v: u64| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = if le { 1 } else { 2 };
        out[6] = 1;
        out[16..18].copy_from_slice(&u16b(e_type));
        out[18..20].copy_from_slice(&u16b(machine));
        out[32..40].copy_from_slice(&u64b(64));
        out[54..56].copy_from_slice(&u16b(56));
        out[56..58].copy_from_slice(&u16b(phdrs.len() as u16));
        let mut data_at = 64 + 56 * phdrs.len() as u64;
        let mut data = Vec::new();
        for (ty, d) in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&u32b(*ty));
            ph[8..16].copy_from_slice(&u64b(data_at));
            ph[32..40].copy_from_slice(&u64b(d.len() as u64));
            out.extend(ph);
            data.extend_from_slice(d);
            data_at += d.len() as u64;
        }
        out.extend(data);
        out
    }

    fn dynamic(tags: &[u64]) -> Vec<u8> {
        let le = cfg!(target_endian = "little");
        tags.iter()
            .flat_map(|&t| {
                let mut e = if le { t.to_le_bytes() } else { t.to_be_bytes() }.to_vec();
                e.extend([0u8; 8]);
                e
            })
            .collect()
    }

    #[test]
    fn static_and_static_pie_executables_pass() {
        let m = host_machine().expect("a known machine");
        assert_eq!(check_static(&elf(2, m, &[(1, vec![0; 8])])), Ok(()));
        // static-pie: ET_DYN with a dynamic section (relocations) but no libraries.
        let pie = elf(3, m, &[(1, vec![0; 8]), (2, dynamic(&[7, 8, 0]))]);
        assert_eq!(check_static(&pie), Ok(()));
    }

    #[test]
    fn dynamic_and_foreign_files_are_refused_with_the_reason() {
        let m = host_machine().expect("a known machine");
        let interp = elf(
            3,
            m,
            &[
                (3, b"/lib64/ld-linux-x86-64.so.2\0".to_vec()),
                (1, vec![0; 8]),
            ],
        );
        assert_eq!(
            check_static(&interp),
            Err(ElfError::Dynamic("/lib64/ld-linux-x86-64.so.2".into()))
        );
        let needs = elf(3, m, &[(1, vec![0; 8]), (2, dynamic(&[1, 0]))]);
        assert_eq!(check_static(&needs), Err(ElfError::NeedsLibraries));
        assert_eq!(
            check_static(&elf(2, m.wrapping_add(1), &[(1, vec![])])),
            Err(ElfError::Machine {
                found: m.wrapping_add(1),
                expected: m
            })
        );
        assert_eq!(
            check_static(&elf(1, m, &[(1, vec![])])),
            Err(ElfError::NotExecutable(1))
        );
        assert_eq!(check_static(&elf(2, m, &[])), Err(ElfError::NoLoad));
        assert_eq!(check_static(b"#!/bin/sh\nexit 0\n"), Err(ElfError::NotElf));
        let full = elf(2, m, &[(1, vec![0; 8])]);
        for cut in [10, 40, 70, 100] {
            assert!(
                matches!(check_static(&full[..cut]), Err(ElfError::Malformed(_))),
                "cut at {cut}: {:?}",
                check_static(&full[..cut])
            );
        }
    }

    /// This test binary is what `cargo build` makes of yard-pause too: glibc, dynamic.
    #[test]
    fn a_glibc_build_is_dynamic() {
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read exe");
        assert!(
            matches!(check_static(&exe), Err(ElfError::Dynamic(_))),
            "{:?}",
            check_static(&exe)
        );
    }

    #[test]
    fn built_in_is_the_embedded_default() {
        let c = crate::config::Config::default_config().expect("default config");
        assert_eq!(c.cri.sandbox_image, BUILT_IN);
        assert!(is_built_in(BUILT_IN));
        assert!(!is_built_in("switchyard.local/pause:1"));
        assert!(!is_built_in("registry.k8s.io/pause:3.10"));
    }

    #[test]
    fn a_missing_binary_is_a_failed_precondition_naming_both_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("yard-pause");
        let e = BuildError {
            path: missing.clone(),
            cause: read_binary(&missing).expect_err("missing"),
        };
        assert_eq!(e.kind(), Kind::FailedPrecondition);
        let msg = crate::error::chain(&e);
        assert!(
            msg.contains("[cri] sandbox_image \"switchyard.local/pause:3.10\"")
                && msg.contains(&format!("[cri] pause_binary {}", missing.display()))
                && msg.contains("missing"),
            "{msg}"
        );
    }
}
