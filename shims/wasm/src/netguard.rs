//! The bound on a guest's sockets. A guest of a task in a pod may use `wasi:sockets`; every
//! socket it holds is a host socket in the worker, so one instance (a command's run, or one
//! HTTP request's instance) holds at most `max_sockets` at once, TCP and UDP together, the
//! connections a listening socket accepted included. The calls that make a socket
//! (`create-tcp-socket`, `create-udp-socket`, `tcp-socket.accept`) are wrapped: at the bound
//! they answer `new-socket-limit` (what the kernel's `EMFILE` maps to) and make nothing; a socket
//! the guest drops frees its place. The wrappers shadow wasmtime-wasi's own functions in the
//! components' linker and call its implementation for the work, as `fsguard.rs` does for opens.
//! (WASI preview 1 has no way to make a socket.)

use wasmtime::StoreContextMut;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily};
use wasmtime_wasi::p2::bindings::sockets::tcp::HostTcpSocket as _;
use wasmtime_wasi::p2::bindings::sockets::tcp_create_socket::Host as _;
use wasmtime_wasi::p2::bindings::sockets::udp_create_socket::Host as _;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, SocketError, TcpSocket, UdpSocket};
use wasmtime_wasi::sockets::WasiSocketsView;

use crate::runtime::P2State;

/// The WASI 0.2 sockets interfaces wasmtime-wasi 48 defines; components importing any 0.2.x
/// version are linked to them.
const TCP_CREATE: &str = "wasi:sockets/tcp-create-socket@0.2.12";
const UDP_CREATE: &str = "wasi:sockets/udp-create-socket@0.2.12";
const TCP: &str = "wasi:sockets/tcp@0.2.12";

/// Sockets in `table` (TCP and UDP).
fn sockets(table: &mut ResourceTable) -> usize {
    table
        .iter_mut()
        .filter(|e| e.is::<TcpSocket>() || e.is::<UdpSocket>())
        .count()
}

/// Whether the instance may hold one more socket.
fn room(state: &mut P2State) -> bool {
    let max = state.max_sockets;
    sockets(&mut state.table) < max
}

/// A wasmtime-wasi result as the guest sees it: its error code, or a trap.
fn answer<T>(r: Result<T, SocketError>) -> wasmtime::Result<(Result<T, ErrorCode>,)> {
    match r {
        Ok(v) => Ok((Ok(v),)),
        Err(e) => Ok((Err(e.downcast()?),)),
    }
}

type Accepted = (
    Resource<TcpSocket>,
    Resource<DynInputStream>,
    Resource<DynOutputStream>,
);

/// Shadow the socket-making calls of the components' linker with the bounded ones.
pub fn add_to_linker(
    components: &mut wasmtime::component::Linker<P2State>,
) -> wasmtime::Result<()> {
    components.allow_shadowing(true);
    components.instance(TCP_CREATE)?.func_wrap(
        "create-tcp-socket",
        |mut store: StoreContextMut<'_, P2State>, (family,): (IpAddressFamily,)| {
            if !room(store.data_mut()) {
                return Ok((Err(ErrorCode::NewSocketLimit),));
            }
            answer(store.data_mut().sockets().create_tcp_socket(family))
        },
    )?;
    components.instance(UDP_CREATE)?.func_wrap_async(
        "create-udp-socket",
        |mut store: StoreContextMut<'_, P2State>, (family,): (IpAddressFamily,)| {
            Box::new(async move {
                if !room(store.data_mut()) {
                    return Ok((Err(ErrorCode::NewSocketLimit),));
                }
                answer(store.data_mut().sockets().create_udp_socket(family).await)
            })
        },
    )?;
    components.instance(TCP)?.func_wrap(
        "[method]tcp-socket.accept",
        |mut store: StoreContextMut<'_, P2State>,
         (this,): (Resource<TcpSocket>,)|
         -> wasmtime::Result<(Result<Accepted, ErrorCode>,)> {
            if !room(store.data_mut()) {
                return Ok((Err(ErrorCode::NewSocketLimit),));
            }
            answer(store.data_mut().sockets().accept(this))
        },
    )?;
    components.allow_shadowing(false);
    Ok(())
}
