//! The integration tests, one binary (one link of the crate instead of one
//! per file): each module is what was a test file, and keeps its name, so
//! a test is named `module::test` (`cli::the_demo_works_as_printed`).
//! `common` is the harness: the simulator and a real qbproxy on loopback,
//! and the real servers some tests start (nginx, HAProxy, redis-server,
//! redis-sentinel, Rack).

mod common;

mod access_log;
mod adversarial;
mod api_keys;
mod chat;
mod cli;
mod faults;
mod files;
mod fleet;
mod forwarding;
mod fuzz_regressions;
mod gateway;
mod identities;
mod lifecycle;
mod pools;
mod rack_oracle;
mod real_upstream;
mod redis_ha;
mod reload;
mod renewal;
mod simulator;
mod streaming;
mod tls;
mod under_load;
mod upstream_connections;
mod workers;
