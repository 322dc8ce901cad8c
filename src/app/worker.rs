//! Proxy workers: one current-thread runtime per core, each accepting on a
//! listener of its own bound to the proxy's address with `SO_REUSEPORT`, as
//! nginx's workers do. The kernel spreads new connections over them; a
//! connection stays on the worker that accepted it.
//!
//! Worker 0 is the main runtime, which also runs the admin listener,
//! renewals, the fleet's tasks and reloads. Workers 1.. are threads of their
//! own (`qbproxy-worker-N`) that only serve the proxy listener. All share
//! one `Proxy` (sessions, pools, limits, metrics); each has an upstream
//! client of its own (`Live::client`), because a pooled upstream connection
//! is driven by the runtime that opened it, and a request from another
//! runtime would cross threads twice to use it (`bench/PROFILE.md`).
//!
//! A worker's tasks run on its thread, so the thread says which worker a
//! request is on: [`current`].

use std::cell::Cell;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread runs: 0 on the main runtime (and on any thread
/// that is no worker's).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as worker `n`'s.
pub(crate) fn enter(n: usize) {
    WORKER.with(|w| w.set(n));
}

/// Binds the proxy's address `workers` times (at least once) with
/// `SO_REUSEPORT`: the first listener for the main runtime, the others for
/// worker threads (as std listeners, to be registered by their own
/// runtimes). Port 0 picks one port for all. Call within a runtime.
///
/// A port another process holds is refused ("address in use") even if that
/// process set `SO_REUSEPORT` too, as a second qbproxy would: the address
/// is first bound once without it, so two instances never silently split
/// one port's connections.
pub fn bind(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
    let one = |addr: SocketAddr, reuseport: bool| -> std::io::Result<TcpSocket> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(reuseport)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    // std's and tokio's `bind` listen with a backlog of 1024 too.
    if workers <= 1 {
        return Ok((one(addr, false)?.listen(1024)?, Vec::new()));
    }
    let bound = {
        let alone = one(addr, false)?;
        alone.local_addr()?
    };
    let first = one(bound, true)?.listen(1024)?;
    let mut more = Vec::with_capacity(workers.saturating_sub(1));
    for _ in 1..workers {
        more.push(one(bound, true)?.listen(1024)?.into_std()?);
    }
    Ok((first, more))
}
