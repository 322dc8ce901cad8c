//! `qbproxy demo`: the built-in QuickBlox simulator on loopback with qbproxy
//! in front of it, configured through the same TOML path as real use, and
//! curl lines to paste.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::sim::{Sim, SimConfig};
use crate::{App, Listeners, StartError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen on {addr} ({what}): {source}; choose another address with --{what}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the simulator: {0}")]
    Sim(std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// The demo's configuration: the simulator's application, and one user
/// identity so that writes work too.
pub fn config(sim: &Sim, listen: SocketAddr, admin: SocketAddr) -> Result<Config, ConfigError> {
    let app = sim.config();
    let user = &app.users[0];
    let text = format!(
        r#"
[listen]
addr = "{listen}"
shutdown_grace = "2s"

[admin]
addr = "{admin}"

[upstream]
url = "{url}"

[quickblox]
application_id = "{app_id}"
auth_key = "{auth_key}"
auth_secret = "{secret}"

[[identity]]
name = "demo"
login = "{login}"
password = "{password}"
"#,
        url = sim.url(),
        app_id = app.application_id,
        auth_key = app.auth_key,
        secret = app.auth_secret,
        login = user.login,
        password = user.password,
    );
    Config::from_toml(&text, Path::new("(demo)"))
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    let proxy_listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DemoError::Bind {
            addr: listen,
            what: "listen",
            source,
        })?;
    let admin_listener = TcpListener::bind(admin)
        .await
        .map_err(|source| DemoError::Bind {
            addr: admin,
            what: "admin",
            source,
        })?;
    let listen = proxy_listener.local_addr().unwrap_or(listen);
    let admin = admin_listener.local_addr().unwrap_or(admin);
    let sim = Sim::start(SimConfig::demo())
        .await
        .map_err(DemoError::Sim)?;
    let app = App::new(config(&sim, listen, admin)?)?;
    let handle = app.handle();
    let sim_url = sim.url();
    tokio::spawn(async move {
        handle.ready().await;
        println!("{}", instructions(&sim_url, listen, admin));
    });
    app.run(
        Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        },
        shutdown,
    )
    .await;
    Ok(())
}

fn instructions(sim: &str, listen: SocketAddr, admin: SocketAddr) -> String {
    let p = format!("http://{listen}");
    let a = format!("http://{admin}");
    format!(
        r#"
qbproxy demo is ready.
  proxy      {p}
  admin      {a}   (/healthz /readyz /metrics)
  simulator  {sim}   (a QuickBlox stand-in; user "demo")

Paste these into another terminal. None of them carries a token or a signature:

  # A GET: qbproxy adds the session's QB-Token; the simulator echoes what it received.
  curl -s '{p}/users.json?page=1&per_page=10'

  # A POST with a JSON body.
  curl -s -X POST {p}/chat/Dialog.json -H 'Content-Type: application/json' -d '{{"type":2,"name":"demo"}}'

  # Expire every session in the simulator, then GET again: qbproxy renews once
  # and replays the refused request, so you still get 200.
  curl -s -X POST {sim}/_sim/expire
  curl -s '{p}/users.json?page=1&per_page=10'

  # The shared session belongs to qbproxy: destroying it is refused with 403,
  # in any spelling, and reading it shows everything but its token.
  curl -s -i -X DELETE {p}/session.json
  curl -s -i -X DELETE '{p}//x/../Session.json'
  curl -s {p}/session.json

  # Readiness and metrics.
  curl -s {a}/readyz
  curl -s {a}/metrics | grep -E '^qbproxy_(requests|session_renewals|replays)'

Ctrl-C stops the demo.
"#
    )
}
