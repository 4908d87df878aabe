//! WASI opens reach regular files and directories only. A task's root comes from an image, and
//! an image can carry device nodes, FIFOs and sockets: the root is mounted `nodev` (so a device
//! cannot be opened at all), and here the one WASI call that opens (`path_open` in preview 1,
//! `descriptor.open-at` in 0.2) is wrapped:
//!
//! - before opening, the path is looked at (with the same symlink rule) and anything but a
//!   regular file, a directory or a symlink is refused, so a FIFO never blocks a thread in
//!   `open`;
//! - after opening, the descriptor itself is looked at, and anything but a regular file or a
//!   directory is closed and refused, so nothing else reaches a guest even if the path changed
//!   in between.
//!
//! A refusal is `EACCES` (`access` in WASI 0.2). The wrappers shadow wasmtime-wasi's own
//! functions in the linkers and call its implementation for the work.

use wasmtime::component::Resource;
use wasmtime::{Caller, Linker, StoreContextMut};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p1::types as p1;
use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1 as P1;
use wasmtime_wasi::p2::bindings::filesystem::types::{self as p2, Host as _, HostDescriptor as _};
use wiggle::{GuestMemory, GuestPtr};

use crate::runtime::{P1State, P2State};

/// The WASI 0.2 filesystem interface wasmtime-wasi 48 defines; components importing any 0.2.x
/// version are linked to it.
const P2_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Shadow the open calls of both linkers with the guarded ones.
pub fn add_to_linkers(
    modules: &mut Linker<P1State>,
    components: &mut wasmtime::component::Linker<P2State>,
) -> wasmtime::Result<()> {
    modules.allow_shadowing(true);
    modules.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_open",
        |mut caller: Caller<'_, P1State>,
         (fd, dirflags, path, path_len, oflags, base, inheriting, fdflags, out): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                let args = P1Open {
                    fd,
                    dirflags,
                    path,
                    path_len,
                    oflags,
                    base,
                    inheriting,
                    fdflags,
                    out,
                };
                p1_path_open(&mut caller, args).await
            })
        },
    )?;
    modules.allow_shadowing(false);
    components.allow_shadowing(true);
    components.instance(P2_TYPES)?.func_wrap_async(
        "[method]descriptor.open-at",
        |store: StoreContextMut<'_, P2State>,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            p2::PathFlags,
            String,
            p2::OpenFlags,
            p2::DescriptorFlags,
        )| Box::new(p2_open_at(store, fd, path_flags, path, oflags, flags)),
    )?;
    components.allow_shadowing(false);
    Ok(())
}

/// What may be opened: a symlink only to be followed or refused by the open itself.
fn p1_may_open(t: p1::Filetype) -> bool {
    matches!(
        t,
        p1::Filetype::RegularFile | p1::Filetype::Directory | p1::Filetype::SymbolicLink
    )
}

fn p1_may_keep(t: p1::Filetype) -> bool {
    matches!(t, p1::Filetype::RegularFile | p1::Filetype::Directory)
}

fn p2_may_open(t: p2::DescriptorType) -> bool {
    matches!(
        t,
        p2::DescriptorType::RegularFile
            | p2::DescriptorType::Directory
            | p2::DescriptorType::SymbolicLink
    )
}

fn p2_may_keep(t: p2::DescriptorType) -> bool {
    matches!(
        t,
        p2::DescriptorType::RegularFile | p2::DescriptorType::Directory
    )
}

/// `path_open`'s raw arguments.
struct P1Open {
    fd: i32,
    dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    base: i64,
    inheriting: i64,
    fdflags: i32,
    out: i32,
}

async fn p1_path_open(caller: &mut Caller<'_, P1State>, a: P1Open) -> wasmtime::Result<i32> {
    let errno = |e: p1::Errno| Ok(e as i32);
    let Some(wasmtime::Extern::Memory(memory)) = caller.get_export("memory") else {
        return Err(wasmtime::Error::msg(
            "path_open: the module exports no memory",
        ));
    };
    let (mem, state) = memory.data_and_store_mut(&mut *caller);
    let mut mem = GuestMemory::Unshared(mem);
    let ctx = &mut state.wasi;
    let (Ok(dirflags), Ok(oflags), Ok(base), Ok(inheriting), Ok(fdflags)) = (
        p1::Lookupflags::try_from(a.dirflags),
        p1::Oflags::try_from(a.oflags),
        p1::Rights::try_from(a.base),
        p1::Rights::try_from(a.inheriting),
        p1::Fdflags::try_from(a.fdflags),
    ) else {
        return errno(p1::Errno::Inval);
    };
    let dirfd = p1::Fd::from(a.fd as u32);
    let path = GuestPtr::<str>::new((a.path as u32, a.path_len as u32));
    if let Ok(st) = P1::path_filestat_get(ctx, &mut mem, dirfd, dirflags, path).await
        && !p1_may_open(st.filetype)
    {
        return errno(p1::Errno::Acces);
    }
    let fd = match P1::path_open(
        ctx, &mut mem, dirfd, dirflags, path, oflags, base, inheriting, fdflags,
    )
    .await
    {
        Ok(fd) => fd,
        // An errno for the guest, or a trap.
        Err(e) => return e.downcast().map(|errno| errno as i32),
    };
    match P1::fd_filestat_get(ctx, &mut mem, fd).await {
        Ok(st) if p1_may_keep(st.filetype) => {}
        _ => {
            let _ = P1::fd_close(ctx, &mut mem, fd).await;
            return errno(p1::Errno::Acces);
        }
    }
    if mem
        .write(GuestPtr::<p1::Fd>::new(a.out as u32), fd)
        .is_err()
    {
        let _ = P1::fd_close(ctx, &mut mem, fd).await;
        return errno(p1::Errno::Fault);
    }
    Ok(0)
}

async fn p2_open_at(
    mut store: StoreContextMut<'_, P2State>,
    fd: Resource<Descriptor>,
    path_flags: p2::PathFlags,
    path: String,
    oflags: p2::OpenFlags,
    flags: p2::DescriptorFlags,
) -> wasmtime::Result<(Result<Resource<Descriptor>, p2::ErrorCode>,)> {
    let mut view = store.data_mut().filesystem();
    let dir = || Resource::<Descriptor>::new_borrow(fd.rep());
    if let Ok(st) = view.stat_at(dir(), path_flags, path.clone()).await
        && !p2_may_open(st.type_)
    {
        return Ok((Err(p2::ErrorCode::Access),));
    }
    let opened = match view.open_at(dir(), path_flags, path, oflags, flags).await {
        Ok(d) => d,
        Err(e) => return Ok((Err(view.convert_error_code(e)?),)),
    };
    match view.get_type(Resource::new_borrow(opened.rep())).await {
        Ok(t) if p2_may_keep(t) => Ok((Ok(opened),)),
        _ => {
            view.drop(opened)?;
            Ok((Err(p2::ErrorCode::Access),))
        }
    }
}
