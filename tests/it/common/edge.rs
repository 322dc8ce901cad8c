//! Real edge servers in front of the simulator, as QuickBlox and most Rails
//! deployments are fronted: Debian's nginx (1.22) or HAProxy (2.6),
//! terminating TLS on loopback, offering HTTP/2 and HTTP/1.1 by ALPN (or
//! HTTP/1.1 alone), and passing requests to the simulator over HTTP/1.1.
//!
//! Each edge adds `X-Edge-Protocol` (the protocol qbproxy spoke to it) to
//! what it passes on, so a test reads from the simulator's record how its
//! request travelled. The Debian packages `nginx-light` and `haproxy`
//! provide the binaries; `.ci/run` installs them. A missing binary fails
//! the test with that instruction: a test never skips quietly.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::bounded;
use super::certs::{Ca, Dir};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Nginx,
    Haproxy,
}

/// How the edge is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Offer HTTP/2 by ALPN (else HTTP/1.1 only).
    pub http2: bool,
    /// nginx `keepalive_requests`: requests per client connection, after
    /// which nginx sends GOAWAY (HTTP/2) or closes (HTTP/1.1). nginx's
    /// default is 1000.
    pub keepalive_requests: u32,
    /// nginx `keepalive_timeout` (HAProxy `timeout http-keep-alive`), in
    /// seconds.
    pub keepalive_timeout: u32,
    /// `http2_max_concurrent_streams` (HAProxy
    /// `tune.h2.max-concurrent-streams`).
    pub max_streams: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            http2: true,
            keepalive_requests: 1000,
            keepalive_timeout: 75,
            max_streams: 128,
        }
    }
}

pub struct Edge {
    pub server: Server,
    pub port: u16,
    dir: Dir,
    child: Child,
    ca_file: String,
}

impl Edge {
    /// Starts `server` on a free loopback port in front of `backend`.
    pub async fn start(server: Server, backend: SocketAddr, options: Options) -> Edge {
        let dir = Dir::new(match server {
            Server::Nginx => "nginx",
            Server::Haproxy => "haproxy",
        });
        let ca = Ca::new("edge CA");
        let (cert, key) = ca.ecdsa_leaf();
        let ca_file = dir.write("ca.crt", &ca.pem);
        let cert_file = dir.write("edge.crt", &cert);
        let key_file = dir.write("edge.key", &key);
        let bundle = dir.write("edge.pem", &format!("{cert}{key}"));
        // A port is free when bound here and released; another process can
        // take it meanwhile, so a start that fails to bind is tried again.
        for _ in 0..5 {
            let port = free_port();
            let mut command = match server {
                Server::Nginx => {
                    let conf = nginx_conf(&dir, port, backend, &options, &cert_file, &key_file);
                    let path = dir.write("nginx.conf", &conf);
                    let mut c = Command::new("nginx");
                    c.arg("-e")
                        .arg(dir.path().join("error.log"))
                        .arg("-c")
                        .arg(path);
                    c
                }
                Server::Haproxy => {
                    let conf = haproxy_conf(port, backend, &options, &bundle);
                    let path = dir.write("haproxy.cfg", &conf);
                    let mut c = Command::new("haproxy");
                    c.arg("-db").arg("-f").arg(path);
                    c
                }
            };
            let install = "Debian's nginx-light and haproxy (.ci/run installs them)";
            let mut child = spawn_logged(&mut command, dir.path(), install);
            if listening(&mut child, port).await {
                return Edge {
                    server,
                    port,
                    dir,
                    child,
                    ca_file,
                };
            }
            let _ = child.kill().await;
        }
        let mut logs = String::new();
        for f in ["error.log", "stderr.log"] {
            logs.push_str(&std::fs::read_to_string(dir.path().join(f)).unwrap_or_default());
        }
        panic!("{server:?} did not start:\n{logs}");
    }

    /// The URL qbproxy's `upstream.url` takes.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The CA that signed the edge's certificate, for `upstream.ca_file`.
    pub fn ca_file(&self) -> &str {
        &self.ca_file
    }

    /// What the edge logged, for a failing assertion's message.
    pub fn log(&self) -> String {
        let mut logs = String::new();
        for f in ["error.log", "stderr.log", "access.log"] {
            logs.push_str(&std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default());
        }
        logs
    }

    /// The edge's access log lines (nginx: one per request: connection
    /// number, its request count, protocol, method, target, status).
    pub fn access_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a real server the tests drive, its output in `dir`'s
/// `stderr.log` (read when a test fails), killed when dropped; a server
/// that cannot start panics naming `install`, what provides it.
pub fn spawn_logged(command: &mut Command, dir: &std::path::Path, install: &str) -> Child {
    let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?} ({e}): install {install}"))
}

/// Resolves true once the port accepts connections, false if the process
/// exits first (e.g. the port was taken).
pub async fn listening(child: &mut Child, port: u16) -> bool {
    bounded("the edge server to listen", async {
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return true;
            }
            // A process starting up has no event to wait on: poll its port.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn nginx_conf(
    dir: &Dir,
    port: u16,
    backend: SocketAddr,
    o: &Options,
    cert: &str,
    key: &str,
) -> String {
    let d = dir.path().display();
    let http2 = if o.http2 { " http2" } else { "" };
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
    log_format qb '$connection $connection_requests $server_protocol $request_method $request_uri $status';
    access_log {d}/access.log qb;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 64m;
    keepalive_requests {kr};
    keepalive_timeout {kt}s;
    http2_max_concurrent_streams {ms};
    upstream sim {{
        server {backend};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl{http2};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Edge-Protocol $server_protocol;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"#,
        kr = o.keepalive_requests,
        kt = o.keepalive_timeout,
        ms = o.max_streams,
    )
}

fn haproxy_conf(port: u16, backend: SocketAddr, o: &Options, bundle: &str) -> String {
    let alpn = if o.http2 { "h2,http/1.1" } else { "http/1.1" };
    format!(
        r#"global
    tune.h2.max-concurrent-streams {ms}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive {kt}s
frontend edge
    bind 127.0.0.1:{port} ssl crt {bundle} alpn {alpn}
    http-request set-header X-Edge-Protocol HTTP/2.0 if {{ req.ver 2.0 }}
    http-request set-header X-Edge-Protocol HTTP/1.1 if {{ req.ver 1.1 }}
    default_backend sim
backend sim
    server sim {backend}
"#,
        ms = o.max_streams,
        kt = o.keepalive_timeout,
    )
}
