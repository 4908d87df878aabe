//! Issue 16 item 2: crafted layers that made the old two-parser design (a guard re-parsing the
//! stream beside the `tar` crate) disagree about where headers are, and what each did: a
//! header-only entry with a size, GNU sparse extension blocks, a PAX header with a blank line,
//! a sparse file declaring more zeros than the layer holds, and a layer far larger uncompressed
//! than compressed. Each is refused with an error naming the entry, and the unpack's peak memory
//! (counted by this binary's allocator, per thread) stays small whatever the layer declares.
//!
//! The archives are built here, byte by byte where a writer would refuse to make them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;

use switchyard_images::unpack::{self, Applied, Limits, Nodes, Options, UnpackError, Whiteouts};
use tar::{EntryType, Header};

// ---- a per-thread counting allocator ----

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes as isize;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - bytes as isize));
}

// SAFETY: every call is forwarded to the system allocator with the caller's arguments; the
// bookkeeping only touches const-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most memory this thread held above what it held
/// before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// What an unpack may hold: its 128 KiB copy buffer, the decompressors' windows and buffers,
/// one capped special entry (1 MiB) and change. Every crafted layer below tried to make the old
/// code hold far more.
const MEMORY_BOUND: usize = 8 << 20;

/// What the crafted layers hide: a special entry of this many bytes, present in the stream.
const HIDDEN: usize = 64 << 20;

// ---- building archives ----

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn header(name: &str, kind: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h.set_cksum();
    h
}

fn block(h: &Header) -> Vec<u8> {
    h.as_bytes().to_vec()
}

/// A PAX header whose data is `HIDDEN` bytes: the first block of that data is `first` (padded),
/// the rest zeros.
fn hidden_pax(first: &[u8]) -> Vec<u8> {
    let mut out = block(&header(
        "PaxHeaders/hidden",
        EntryType::XHeader,
        HIDDEN as u64,
    ));
    let mut data = vec![0u8; HIDDEN];
    data[..first.len()].copy_from_slice(first);
    out.extend(data);
    out
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend([0u8; 1024]);
    tar
}

/// A directory entry whose size field says 1024: `tar` skipped that much "data", the guard did
/// not, and read a file header there whose data covered the PAX header `tar` found next.
fn header_only_with_size() -> Vec<u8> {
    let mut tar = block(&header("d/", EntryType::Directory, 1024));
    tar.extend(block(&header(
        "cover",
        EntryType::Regular,
        1024 + HIDDEN as u64,
    )));
    tar.extend([0u8; 512]);
    tar.extend(hidden_pax(&[]));
    end(tar)
}

/// A GNU sparse entry with one extension block: `tar` read the block as part of the header, the
/// guard read it as the next header. The block is a valid (empty) sparse map for `tar` and, in
/// the bytes `tar` ignores, a regular file of 512 bytes for the guard.
fn sparse_extension_block() -> Vec<u8> {
    let mut h = header("sparse", EntryType::GNUSparse, 0);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.isextended[0] = 1;
    gnu.realsize.copy_from_slice(b"00000000000\0");
    h.set_cksum();
    let mut tar = block(&h);
    let mut ext = [0u8; 512];
    // Entry 5 of the map (bytes 120..144) is empty for `tar` (its first byte is 0); bytes
    // 124..132 are the size field for the guard. Byte 156 (the type) starts entry 6's length,
    // whose offset's first byte is 0: empty too.
    ext[124..132].copy_from_slice(b"00001000");
    ext[156] = b'0';
    tar.extend(ext);
    // A fake header for the guard at the start of the hidden data: its "file" spans the rest.
    let mut fake = header("skip", EntryType::Regular, 0);
    fake.set_size((HIDDEN - 512) as u64);
    tar.extend(hidden_pax(fake.as_bytes()));
    end(tar)
}

/// A PAX header whose records start with a blank line: `tar` stops there, the guard read on and
/// took a `size` for the next file, skipping the PAX header `tar` found after it.
fn pax_after_blank_line() -> Vec<u8> {
    let size = 512 + HIDDEN as u64;
    let record = {
        let body = format!(" size={size}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    };
    let data = format!("\n{record}");
    let mut tar = block(&header(
        "PaxHeaders/blank",
        EntryType::XHeader,
        data.len() as u64,
    ));
    let mut padded = data.into_bytes();
    padded.resize(512, 0);
    tar.extend(padded);
    tar.extend(block(&header("after-blank", EntryType::Regular, 0)));
    tar.extend(hidden_pax(&[]));
    end(tar)
}

/// A sparse file of `real` bytes holding one block of data at its end: `tar` hands out `real`
/// bytes, almost all of them zeros it makes up.
fn sparse_zeros(real: u64) -> Vec<u8> {
    let mut h = header("zeros", EntryType::GNUSparse, 512);
    let gnu = h.as_gnu_mut().unwrap();
    let octal = |v: u64| {
        let s = format!("{v:011o}\0");
        let mut out = [0u8; 12];
        out.copy_from_slice(s.as_bytes());
        out
    };
    gnu.sparse[0].offset = octal(real - 512);
    gnu.sparse[0].numbytes = octal(512);
    gnu.realsize = octal(real);
    h.set_cksum();
    let mut tar = block(&h);
    tar.extend([7u8; 512]);
    end(tar)
}

/// A regular file of `len` zeros (compresses about a thousand times with gzip).
fn zeros_file(len: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header("zeros", EntryType::Regular, len as u64);
    h.set_cksum();
    b.append(&h, &vec![0u8; len][..]).unwrap();
    b.into_inner().unwrap()
}

fn apply(layer: &[u8], root: &Path, limits: Limits) -> Result<Applied, UnpackError> {
    let opts = Options {
        whiteouts: Whiteouts::Remove,
        nodes: Nodes::Allow,
        max_tar_bytes: limits.max_tar_bytes(layer.len() as u64),
    };
    unpack::apply_layer(layer, root, &opts)
}

/// Unpacks `layer` (gzip-compressed here, as registries serve layers), expecting a refusal
/// naming `entry`; checks the unpack's peak memory.
fn refused(what: &str, tar: Vec<u8>, entry: &str) -> UnpackError {
    let layer = gzip(&tar);
    drop(tar);
    let dir = tempfile::tempdir().unwrap();
    let (result, peak) = peak_during(|| apply(&layer, dir.path(), Limits::default()));
    let err = match result {
        Ok(applied) => panic!("{what}: unpacked ({applied:?}), peak memory {peak} bytes"),
        Err(e) => e,
    };
    let message = switchyard_base::chain(&err);
    eprintln!("{what}: {message} (peak memory {peak} bytes)");
    assert!(
        message.contains(&format!("{entry:?}")),
        "{what}: the error does not name entry {entry:?}: {message}"
    );
    assert!(
        peak < MEMORY_BOUND,
        "{what}: the unpack held {peak} bytes at its peak (bound {MEMORY_BOUND})"
    );
    err
}

#[test]
fn issue16_a_header_only_entry_with_a_size_is_refused() {
    let err = refused("header-only with size", header_only_with_size(), "d/");
    assert!(matches!(err, UnpackError::DataOnHeaderOnly { .. }), "{err}");
}

#[test]
fn issue16_gnu_sparse_extension_blocks_are_refused() {
    let err = refused("sparse extension block", sparse_extension_block(), "sparse");
    assert!(matches!(err, UnpackError::Sparse { .. }), "{err}");
}

#[test]
fn issue16_a_pax_header_with_a_blank_line_is_refused() {
    let err = refused("PAX blank line", pax_after_blank_line(), "PaxHeaders/blank");
    assert!(matches!(err, UnpackError::Pax { .. }), "{err}");
}

#[test]
fn issue16_a_sparse_file_writes_no_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let layer = gzip(&sparse_zeros(64 << 20));
    let result = apply(&layer, dir.path(), Limits::default());
    let written = std::fs::metadata(dir.path().join("zeros"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        matches!(&result, Err(UnpackError::Sparse { entry }) if entry == "zeros"),
        "{result:?} ({written} bytes written)"
    );
    assert_eq!(written, 0, "the sparse file's zeros were written");
}

#[test]
fn issue16_special_entries_are_capped_in_memory() {
    // Sizes declared far beyond the stream, and data actually present past the cap.
    let mut huge_pax = block(&header("PaxHeaders/huge", EntryType::XHeader, 8 << 30));
    huge_pax.extend(vec![0u8; 4 << 20]);
    refused("PAX header of 8 GiB", end(huge_pax), "PaxHeaders/huge");
    let mut long_name = block(&header("././@LongLink", EntryType::GNULongName, 4 << 20));
    long_name.extend(vec![b'a'; 4 << 20]);
    refused("GNU long name of 4 MiB", end(long_name), "@LongLink");
    let mut long_link = block(&header("././@LongLink", EntryType::GNULongLink, 4 << 20));
    long_link.extend(vec![b'a'; 4 << 20]);
    refused("GNU long link of 4 MiB", end(long_link), "@LongLink");
}

#[test]
fn issue16_uncompressed_bytes_are_bounded_per_layer() {
    let tar = zeros_file(16 << 20);
    let layer = gzip(&tar);
    let dir = tempfile::tempdir().unwrap();
    // gzip squeezes zeros about a thousandfold: a ratio of 100 refuses the layer...
    let tight = Limits {
        max_ratio: 100,
        max_bytes: u64::MAX,
    };
    let err = apply(&layer, dir.path(), tight).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "ratio: {err}");
    // ...and so does an absolute cap below its size, whatever the ratio.
    let capped = Limits {
        max_ratio: u64::MAX,
        max_bytes: 1 << 20,
    };
    let dir = tempfile::tempdir().unwrap();
    let err = apply(&tar, dir.path(), capped).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { .. }),
        "absolute: {err}"
    );
    // The defaults take it: a thousandfold is what gzip does to zeros.
    let dir = tempfile::tempdir().unwrap();
    let applied = apply(&layer, dir.path(), Limits::default()).unwrap();
    assert_eq!(applied.tar_bytes, tar.len() as u64);
    // zstd does far better on zeros than any layer needs: refused by the default ratio.
    let zst = zstd::encode_all(&zeros_file(64 << 20)[..], 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = apply(&zst, dir.path(), Limits::default()).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { .. }),
        "zstd zeros ({} bytes compressed): {err}",
        zst.len()
    );
}
