//! What the gateway decides about a request before anything is forwarded:
//! who the client is and what it may do (`access`), the one canonical form
//! of the request (`canonical`), method overrides Rack would read
//! (`overrides`), and which identity or pool serves it (`route`).

pub(crate) mod access;
pub mod canonical;
pub mod overrides;
pub(crate) mod route;
