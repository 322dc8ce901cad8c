//! `qbproxy demo`: the built-in QuickBlox simulator on loopback with qbproxy
//! in front of it, configured through the same TOML path as real use, and
//! curl lines to paste. With `--tls`, qbproxy serves HTTPS with a
//! certificate from a throw-away CA made at start, as the official SDKs
//! need.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;

use qbproxy::{App, Listeners, StartError};
use qbproxy::{Config, ConfigError};
use qbproxy_sim::{Sim, SimConfig};

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
    #[error("cannot make the demo's certificates: {0}")]
    Certificates(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// What `qbproxy demo` was asked for.
pub struct DemoArgs {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Chat: XMPP over WebSocket, and over TCP.
    pub chat: SocketAddr,
    pub chat_tcp: SocketAddr,
    /// Serve HTTPS with a throw-away CA's certificate.
    pub tls: bool,
}

/// A throw-away certificate authority and a server certificate it signed
/// for `localhost`, 127.0.0.1 and the listen address, as PEM files in a
/// private temporary directory that is removed when this is dropped.
pub struct DemoCa {
    dir: tempfile::TempDir,
}

impl DemoCa {
    pub fn new(listen: SocketAddr) -> Result<DemoCa, DemoError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let bad = |e: &dyn std::fmt::Display| DemoError::Certificates(e.to_string());
        let ca_key = KeyPair::generate().map_err(|e| bad(&e))?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| bad(&e))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "qbproxy demo CA (throw-away)");
        let ca_cert = ca.self_signed(&ca_key).map_err(|e| bad(&e))?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.push(listen.ip().to_string());
        }
        let key = KeyPair::generate().map_err(|e| bad(&e))?;
        let mut leaf = CertificateParams::new(names).map_err(|e| bad(&e))?;
        leaf.distinguished_name
            .push(DnType::CommonName, "qbproxy demo");
        let cert = leaf
            .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
            .map_err(|e| bad(&e))?;
        // TempDir makes the directory 0700: the key is for this user only.
        let dir = tempfile::Builder::new()
            .prefix("qbproxy-demo-")
            .tempdir()
            .map_err(|e| bad(&e))?;
        let demo = DemoCa { dir };
        for (path, text) in [
            (demo.ca(), ca_cert.pem()),
            (demo.cert(), cert.pem()),
            (demo.key(), key.serialize_pem()),
        ] {
            std::fs::write(path, text).map_err(|e| bad(&e))?;
        }
        Ok(demo)
    }

    /// The CA's certificate: what a client trusts.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }
}

/// The demo's configuration: the simulator's application, and one user
/// identity so that writes work too; HTTPS with `tls`'s certificate.
pub fn config(
    sim: &Sim,
    listen: SocketAddr,
    admin: SocketAddr,
    chat: (SocketAddr, SocketAddr),
    tls: Option<&DemoCa>,
) -> Result<Config, ConfigError> {
    let app = sim.config();
    let user = &app.users[0];
    let path = |p: PathBuf| toml::Value::String(p.display().to_string()).to_string();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let tls = tls.map_or(String::new(), |ca| {
        format!(
            "tls_cert = {}\ntls_key = {}\n",
            path(ca.cert()),
            path(ca.key())
        )
    });
    let text = format!(
        r#"
[listen]
addr = "{listen}"
shutdown_grace = "2s"
# Ctrl-C stops the demo at once; a deployment keeps /readyz at 503 first.
shutdown_delay = "0s"
# A new file's upload URL names qbproxy here, so the upload goes through it.
public_url = "{scheme}://{listen}"
{tls}
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

# A second user, so that two may chat.
[[identity]]
name = "other"
login = "{other_login}"
password = "{other_password}"

# Chat through qbproxy, logged in with the sessions it holds.
[chat]
websocket_addr = "{chat_ws}"
tcp_addr = "{chat_tcp}"
upstream = "{chat_upstream}"
"#,
        other_login = app.users[1].login,
        other_password = app.users[1].password,
        chat_ws = chat.0,
        chat_tcp = chat.1,
        chat_upstream = sim.chat_url(),
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
pub async fn run(args: DemoArgs, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    let DemoArgs {
        listen,
        admin,
        chat,
        chat_tcp,
        tls,
    } = args;
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
    let ca = tls.then(|| DemoCa::new(listen)).transpose()?;
    let app = App::new(config(&sim, listen, admin, (chat, chat_tcp), ca.as_ref())?)?;
    let handle = app.handle();
    let sim_url = sim.url();
    let ca_path = ca.as_ref().map(DemoCa::ca);
    let app_id = sim.config().application_id.clone();
    tokio::spawn(async move {
        handle.ready().await;
        let chat = (
            handle.chat_addr().unwrap_or(chat),
            handle.chat_tcp_addr().unwrap_or(chat_tcp),
        );
        println!(
            "{}",
            instructions(&sim_url, &app_id, listen, admin, chat, ca_path.as_deref())
        );
    });
    app.run(
        Listeners {
            handover: None,
            proxy: proxy_listener,
            admin: admin_listener,
            workers: Vec::new(),
        },
        shutdown,
    )
    .await;
    // The certificates go with the demo.
    drop(ca);
    Ok(())
}

fn instructions(
    sim: &str,
    app_id: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    (chat, chat_tcp): (SocketAddr, SocketAddr),
    ca: Option<&Path>,
) -> String {
    let ws = if ca.is_some() { "wss" } else { "ws" };
    let starttls = if ca.is_some() { ", STARTTLS" } else { "" };
    let (p, curl, trust) = match ca {
        None => (format!("http://{listen}"), "curl".to_owned(), String::new()),
        Some(ca) => {
            let ca = ca.display();
            (
                format!("https://{listen}"),
                format!("curl --cacert {ca}"),
                format!(
                    r#"
HTTPS, with a certificate from a CA made for this demo (removed when it stops):
  ca           {ca}
  application  {app_id}
  curl         curl --cacert {ca} ...
  Node.js      NODE_EXTRA_CA_CERTS={ca} node your-script.js
  An official SDK: init with any token, application {app_id}, API endpoint {listen}
  (JS: QB.init("any-token", {app_id}, null, {{endpoints: {{api: "{listen}"}}}})).
"#
                ),
            )
        }
    };
    let a = format!("http://{admin}");
    format!(
        r#"
qbproxy demo is ready.
  proxy      {p}
  admin      {a}   (/healthz /readyz /metrics)
  simulator  {sim}   (a QuickBlox stand-in; user "demo")
  uploads    {p}   (a new file's upload URL names qbproxy: listen.public_url)
  chat       {ws}://{chat}   (XMPP over WebSocket; users demo 1001 and other 1002)
  chat-tcp   {chat_tcp}   (XMPP over TCP{starttls}; log in as {{user_id}}-{app_id}, any password)
{trust}
Paste these into another terminal. None of them carries a token or a signature:

  # A GET: qbproxy adds the session's QB-Token; the simulator echoes what it received.
  {curl} -s '{p}/users.json?page=1&per_page=10'

  # A POST with a JSON body.
  {curl} -s -X POST {p}/chat/Dialog.json -H 'Content-Type: application/json' -d '{{"type":2,"name":"demo"}}'

  # A file: its upload URL (blob_object_access.params) names qbproxy, so the
  # upload goes through it with the session's token.
  {curl} -s -X POST {p}/blobs.json -d 'blob[name]=a.txt&blob[content_type]=text/plain'

  # Expire every session in the simulator, then GET again: qbproxy renews once
  # and replays the refused request, so you still get 200.
  curl -s -X POST {sim}/_sim/expire
  {curl} -s '{p}/users.json?page=1&per_page=10'

  # The shared session belongs to qbproxy: destroying it is refused with 403,
  # in any spelling, and reading it shows everything but its token.
  {curl} -s -i -X DELETE {p}/session.json
  {curl} -s -i --path-as-is -X DELETE '{p}//x/../Session.json'
  {curl} -s {p}/session.json

  # Readiness and metrics.
  curl -s {a}/readyz
  curl -s {a}/metrics | grep -E '^qbproxy_(requests|session_renewals|replays)'

Ctrl-C stops the demo.
"#
    )
}
