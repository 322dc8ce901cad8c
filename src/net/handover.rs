//! Listening sockets that outlive the process serving them, so that a
//! restart or an upgrade refuses no connection and makes none wait for a
//! process to start:
//!
//! - **systemd socket activation** ([`from_systemd`]): the sockets are
//!   systemd's (`deploy/qbproxy.socket`), passed as `LISTEN_FDS`; across a
//!   restart the kernel queues connections on them until the new process
//!   accepts. A descriptor named `admin` (`FileDescriptorName=admin`) is the
//!   admin listener, `chat-websocket` and `chat-tcp` are `[chat]`'s; every
//!   other one is a proxy listener.
//! - **the in-place upgrade** ([`take_over`], [`Offer`]): a new qbproxy
//!   started with the same `listen.handover_socket` asks the running one
//!   for its listening sockets over that Unix socket (`SCM_RIGHTS`, as
//!   Envoy's hot restart and HAProxy's `expose-fd listeners` do), serves on
//!   them, and once ready tells the old one, which stops accepting and
//!   drains. Both accept on the same sockets in between: a connection waits
//!   in the kernel's queue for whichever accepts first.
//!
//! The exchange, one per connection to the handover socket:
//!
//! ```text
//! new → old   QBPROXY-HANDOVER 1\n
//! old → new   {"pid":…,"proxy":N,"admin":true,"chat":["websocket",…]}\n
//!             + N proxy sockets, the admin one, then the chat ones (SCM_RIGHTS)
//!             or {"refused":"…"}\n                  (no sockets)
//! new → old   READY\n          once it serves with its first sessions
//! ```
//!
//! Before answering, the old process writes its sessions to `[state] file`
//! (if set), which the new one reads as it starts: nobody logs in again. A
//! new process that goes away before `READY` leaves the old one serving as
//! before. Only a process of the same user is answered (`SO_PEERCRED`), and
//! the socket is created 0600.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::sync::watch;

use crate::chat::Kind as ChatTransport;

const HELLO: &[u8] = b"QBPROXY-HANDOVER 1\n";
const READY: &[u8] = b"READY\n";
/// More sockets than any machine has cores (one per proxy worker), and
/// below the kernel's 253 per message.
const MAX_SOCKETS: usize = 128;
/// How long the old process may take to answer (it writes the state file
/// first), and the new one to send its hello.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// How long the old process waits for the new one to be ready before it
/// gives up the handover and serves on alone.
const READY_WITHIN: Duration = Duration::from_secs(600);

/// Listening sockets: the proxy's (one per worker, or one shared) and,
/// optionally, the admin listener's and `[chat]`'s.
pub struct Sockets {
    pub proxy: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
    pub chat: Vec<(ChatTransport, TcpListener)>,
}

impl Sockets {
    /// The same sockets, under new descriptors.
    pub fn try_clone(&self) -> io::Result<Sockets> {
        Ok(Sockets {
            proxy: self
                .proxy
                .iter()
                .map(TcpListener::try_clone)
                .collect::<io::Result<_>>()?,
            admin: self
                .admin
                .as_ref()
                .map(TcpListener::try_clone)
                .transpose()?,
            chat: self
                .chat
                .iter()
                .map(|(kind, l)| Ok((*kind, l.try_clone()?)))
                .collect::<io::Result<_>>()?,
        })
    }
}

/// The sockets systemd passed (`LISTEN_FDS`, `LISTEN_PID`,
/// `LISTEN_FDNAMES`), if any. Call before any other thread starts: it
/// removes those variables, so that no command qbproxy runs inherits them.
pub fn from_systemd() -> io::Result<Option<Sockets>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    std::env::remove_var("LISTEN_FDNAMES");
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut sockets = Sockets {
        proxy: Vec::new(),
        admin: None,
        chat: Vec::new(),
    };
    for i in 0..fds.len() {
        let name = names.get(i).map(String::as_str).unwrap_or("");
        let not_tcp = |detail: String| {
            io::Error::other(format!(
                "socket activation: descriptor {} ({name:?}) {detail}; qbproxy takes \
                 listening TCP sockets only (ListenStream= in the .socket unit)",
                3 + i
            ))
        };
        let listener = fds
            .take_tcp_listener(i)
            .map_err(|e| not_tcp(format!("is refused: {e}")))?
            .ok_or_else(|| not_tcp("was already taken".into()))?;
        // systemd passes them inheritable; no command qbproxy runs needs them.
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC)?;
        let chat = [ChatTransport::WebSocket, ChatTransport::Tcp]
            .into_iter()
            .find(|kind| kind.socket_name() == name);
        if name == "admin" {
            if sockets.admin.replace(listener).is_some() {
                return Err(io::Error::other(
                    "socket activation: two descriptors are named \"admin\"",
                ));
            }
        } else if let Some(kind) = chat {
            if sockets.chat.iter().any(|(k, _)| *k == kind) {
                return Err(io::Error::other(format!(
                    "socket activation: two descriptors are named {name:?}"
                )));
            }
            sockets.chat.push((kind, listener));
        } else {
            sockets.proxy.push(listener);
        }
    }
    if sockets.proxy.is_empty() {
        return Err(io::Error::other(
            "socket activation: only an admin socket was passed; the proxy's needs \
             FileDescriptorName=proxy (any name but admin)",
        ));
    }
    Ok(Some(sockets))
}

/// The running qbproxy this one takes over from: told when this one is
/// ready, it stops accepting and drains.
pub struct Predecessor {
    stream: UnixStream,
    pub pid: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Answer {
    Sockets {
        pid: u32,
        proxy: usize,
        admin: bool,
        /// `[chat]`'s sockets, after the admin one. Absent from the answers
        /// of releases before chat: none.
        #[serde(default)]
        chat: Vec<ChatTransport>,
    },
    Refused {
        refused: String,
    },
}

/// Asks the qbproxy serving `path` for its listening sockets. `None` when
/// no process serves it (no file, or a stale one): bind as usual.
pub fn take_over(path: &Path) -> io::Result<Option<(Sockets, Predecessor)>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN))?;
    stream.write_all(HELLO)?;
    let mut data = [0u8; 512];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let text = &data[..got.bytes];
    if text.is_empty() {
        return Err(io::Error::other(
            "the running qbproxy closed the handover socket without answering",
        ));
    }
    let answer: Answer = serde_json::from_slice(text.trim_ascii_end()).map_err(|_| {
        io::Error::other(format!(
            "{} is not a qbproxy handover socket (it answered {:?})",
            path.display(),
            String::from_utf8_lossy(text)
        ))
    })?;
    let (pid, proxy, admin, chat) = match answer {
        Answer::Sockets {
            pid,
            proxy,
            admin,
            chat,
        } => (pid, proxy, admin, chat),
        Answer::Refused { refused } => {
            return Err(io::Error::other(format!(
                "the running qbproxy refused the handover: {refused}"
            )))
        }
    };
    if proxy == 0 || fds.len() != proxy + usize::from(admin) + chat.len() {
        return Err(io::Error::other(format!(
            "the running qbproxy (pid {pid}) announced {proxy} proxy sockets{}{} but sent {}",
            if admin { ", an admin one" } else { "" },
            if chat.is_empty() {
                String::new()
            } else {
                format!(" and {} chat ones", chat.len())
            },
            fds.len()
        )));
    }
    let mut listeners = fds.into_iter().map(TcpListener::from);
    let sockets = Sockets {
        proxy: listeners.by_ref().take(proxy).collect(),
        admin: if admin { listeners.next() } else { None },
        chat: chat.into_iter().zip(listeners).collect(),
    };
    Ok(Some((sockets, Predecessor { stream, pid })))
}

impl Predecessor {
    /// Tells the old process this one serves: it stops accepting and drains.
    pub fn ready(mut self) -> io::Result<()> {
        self.stream.write_all(READY)
    }
}

/// The handover socket of this process, and the sockets it hands over.
pub struct Offer {
    listener: UnixListener,
    /// Where it was bound, and where it is published.
    bound_at: PathBuf,
    path: PathBuf,
    sockets: Sockets,
    predecessor: Option<Predecessor>,
}

impl Offer {
    /// Binds the handover socket (0600) beside `path`; it is published at
    /// `path` by [`Offer::serve`] (at once, or once this process is ready
    /// when it took over from `predecessor`). `sockets`: the listening
    /// sockets to hand over (copies of those served).
    pub fn bind(
        path: &Path,
        sockets: Sockets,
        predecessor: Option<Predecessor>,
    ) -> io::Result<Offer> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other("listen.handover_socket names no file"))?;
        let bound_at = path.with_file_name(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&bound_at);
        let listener = UnixListener::bind(&bound_at)?;
        std::fs::set_permissions(&bound_at, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Offer {
            listener,
            bound_at,
            path: path.to_owned(),
            sockets,
            predecessor,
        })
    }

    /// Publishes the socket and answers handover requests until one
    /// succeeds (then calls `handed_over` with the new process's pid) or
    /// `leaving` turns true. `ready` resolves when this process serves with
    /// its first sessions; `save` writes the state file.
    pub(crate) async fn serve(
        self,
        ready: impl std::future::Future<Output = ()> + Send,
        save: impl Fn() + Send + Sync + 'static,
        handed_over: impl FnOnce(u32) + Send,
        mut leaving: watch::Receiver<bool>,
    ) {
        let Offer {
            listener,
            bound_at,
            path,
            mut sockets,
            predecessor,
        } = self;
        // A process that took over publishes its socket once it serves.
        if predecessor.is_some() {
            tokio::select! {
                () = ready => {}
                () = left(&mut leaving) => {
                    let _ = std::fs::remove_file(&bound_at);
                    return;
                }
            }
        }
        // Published before the predecessor is told, so that its own socket
        // file, replaced, is not removed when it stops (`Published`).
        let published = std::fs::rename(&bound_at, &path);
        if let Some(predecessor) = predecessor {
            let pid = predecessor.pid;
            match tokio::task::spawn_blocking(move || predecessor.ready()).await {
                Ok(Ok(())) => tracing::info!(
                    pid,
                    "ready: the process taken over from stops accepting and drains"
                ),
                _ => tracing::warn!(
                    pid,
                    "the process taken over from went away (or gave up) before this one was ready; \
                     if it still runs, both serve: stop it with SIGTERM"
                ),
            }
        }
        if let Err(e) = published {
            tracing::warn!(path = %path.display(), error = %e, "cannot publish the handover socket; no upgrade can take over from this process");
            return;
        }
        let _published = Published::new(&path);
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve the handover socket");
                return;
            }
        };
        tracing::info!(path = %path.display(), "a new qbproxy started with this config takes over from this one (listen.handover_socket)");
        let save = std::sync::Arc::new(save);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "handover socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = left(&mut leaving) => return,
            };
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(_) => continue,
            };
            let save = save.clone();
            let exchange = tokio::task::spawn_blocking(move || {
                let result = exchange(stream, &sockets, &*save);
                (sockets, result)
            });
            let result;
            (sockets, result) = match exchange.await {
                Ok(done) => done,
                Err(_) => return,
            };
            match result {
                Ok(pid) => {
                    tracing::info!(
                        pid,
                        "handed over: process {pid} serves on these sockets; this one stops accepting and drains"
                    );
                    handed_over(pid);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "handover not done; serving on"),
            }
        }
    }
}

/// One handover, on a blocking thread: the hello, the state file, the
/// sockets, then `READY` from the new process. Its pid, once ready.
fn exchange(mut stream: UnixStream, sockets: &Sockets, save: &dyn Fn()) -> io::Result<u32> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN))?;
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    if peer.uid != rustix::process::getuid() {
        refuse(&mut stream, "not the same user")?;
        return Err(io::Error::other(format!(
            "a process of user {} asked for the listening sockets; only this user's may",
            peer.uid.as_raw()
        )));
    }
    let pid = peer.pid.as_raw_nonzero().get() as u32;
    // A line, however short, up to the hello's length.
    let mut hello = Vec::with_capacity(HELLO.len());
    let mut byte = [0u8; 1];
    while hello.len() < HELLO.len() && hello.last() != Some(&b'\n') {
        match stream.read(&mut byte)? {
            0 => break,
            _ => hello.push(byte[0]),
        }
    }
    if hello != HELLO {
        refuse(&mut stream, "unknown request")?;
        return Err(io::Error::other(format!(
            "process {pid} sent something else than a handover request"
        )));
    }
    tracing::info!(
        pid,
        "process {pid} asks for the listening sockets (an upgrade); saving the state, sending them"
    );
    save();
    let header = serde_json::to_vec(&Answer::Sockets {
        pid: std::process::id(),
        proxy: sockets.proxy.len(),
        admin: sockets.admin.is_some(),
        chat: sockets.chat.iter().map(|(kind, _)| *kind).collect(),
    })
    .map_err(io::Error::other)?;
    let fds: Vec<BorrowedFd<'_>> = sockets
        .proxy
        .iter()
        .chain(&sockets.admin)
        .chain(sockets.chat.iter().map(|(_, l)| l))
        .map(AsFd::as_fd)
        .collect();
    if fds.len() > MAX_SOCKETS {
        refuse(&mut stream, "too many sockets")?;
        return Err(io::Error::other("too many sockets to hand over"));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let mut line = header;
    line.push(b'\n');
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(&line)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != line.len() {
        return Err(io::Error::other("the handover message was cut short"));
    }
    stream.set_read_timeout(Some(READY_WITHIN))?;
    let mut ready = [0u8; READY.len()];
    match stream.read_exact(&mut ready) {
        Ok(()) if ready == READY => Ok(pid),
        Ok(()) => Err(io::Error::other(format!(
            "process {pid} answered something else than READY"
        ))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::other(format!(
            "process {pid} went away before it was ready"
        ))),
        Err(e) => Err(io::Error::other(format!(
            "process {pid} was not ready within {} s: {e}",
            READY_WITHIN.as_secs()
        ))),
    }
}

/// Resolves once `leaving` turns true (or its sender is gone).
async fn left(leaving: &mut watch::Receiver<bool>) {
    let _ = leaving.wait_for(|l| *l).await;
}

fn refuse(stream: &mut UnixStream, why: &str) -> io::Result<()> {
    let mut line = serde_json::to_vec(&Answer::Refused {
        refused: why.into(),
    })
    .map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// The published handover socket: removed when this process stops,
/// unless a successor's has replaced it.
struct Published {
    path: PathBuf,
    ino: Option<u64>,
}

impl Published {
    fn new(path: &Path) -> Published {
        Published {
            path: path.to_owned(),
            ino: std::fs::metadata(path).ok().map(|m| m.ino()),
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let still_ours = std::fs::metadata(&self.path).ok().map(|m| m.ino()) == self.ino;
        if still_ours && self.ino.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer names `[chat]`'s sockets by transport, and an answer from
    /// a release before chat (no `chat`) reads as one without chat sockets,
    /// so an upgrade from it still takes the proxy's and admin's over.
    #[test]
    fn the_answer_lists_chat_sockets_and_reads_without_them() {
        let answer = Answer::Sockets {
            pid: 7,
            proxy: 2,
            admin: true,
            chat: vec![ChatTransport::WebSocket, ChatTransport::Tcp],
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"pid":7,"proxy":2,"admin":true,"chat":["websocket","tcp"]}"#
        );
        let old: Answer = serde_json::from_str(r#"{"pid":7,"proxy":1,"admin":true}"#).unwrap();
        assert!(matches!(
            old,
            Answer::Sockets { proxy: 1, admin: true, ref chat, .. } if chat.is_empty()
        ));
        let refused: Answer = serde_json::from_str(r#"{"refused":"not the same user"}"#).unwrap();
        assert!(matches!(refused, Answer::Refused { .. }));
    }
}
