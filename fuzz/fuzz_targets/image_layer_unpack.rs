//! A layer tarball (plain, gzip or zstd) unpacked into a scratch directory, through the tar
//! guard and every path check.
//!
//! An unpacker bug could write outside the scratch directory or write without bound, so when run
//! as root the target first drops to `nobody` (scripts/fuzz hands it directories `nobody` may
//! write) and caps the size of any file it writes (a bigger one kills it with SIGXFSZ: a
//! finding, with the input saved).
#![no_main]

use switchyard_images::unpack::{Options, Whiteouts, apply_layer};

/// Largest file an input may make.
const FILE_SIZE_CAP: libc::rlim_t = 64 << 20;

fn confine() {
    let limit = libc::rlimit {
        rlim_cur: FILE_SIZE_CAP,
        rlim_max: FILE_SIZE_CAP,
    };
    // SAFETY: setrlimit reads the struct we pass; geteuid/setgid/setuid take plain integers.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        if libc::geteuid() == 0 {
            let nobody = 65534;
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(nobody), 0);
            assert_eq!(libc::setuid(nobody), 0);
        }
    }
}

libfuzzer_sys::fuzz_target!(init: confine(), |data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    // As the store unpacks: whiteouts applied, and a bound on what one layer may expand to.
    let mut opts = Options::new(Whiteouts::Remove);
    opts.max_tar_bytes = 256 << 20;
    let _ = apply_layer(data, dir.path(), &opts);
});
