//! The HTTP plumbing, knowing nothing of QuickBlox: the accept loop and the
//! connection driver (`server`), inbound TLS, resizable limits, the one
//! body type, and the listening sockets across a restart (`handover`).

pub(crate) mod body;
pub mod handover;
pub(crate) mod limit;
pub(crate) mod server;
pub(crate) mod tls;
