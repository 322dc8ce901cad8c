//! Debian's Prosody (0.12), a real XMPP server, as the chat server behind
//! qbproxy: XMPP over WebSocket (`mod_websocket`), accounts in files
//! (`internal_plain`) made with `prosodyctl register`. The simulator's chat
//! is ours; Prosody is the oracle for what qbproxy sends a real server.

use tokio::process::{Child, Command};

use super::certs::Dir;
use super::edge::{free_port, listening, spawn_logged};

pub struct Prosody {
    dir: Dir,
    config: String,
    child: Child,
    pub http_port: u16,
    tls: bool,
}

impl Prosody {
    /// Starts Prosody for the domain `localhost`. `scram_only`: PLAIN is
    /// not offered, so a client must log in with SCRAM-SHA-1.
    pub async fn start(scram_only: bool) -> Prosody {
        Prosody::start_with(scram_only, None).await
    }

    /// Prosody serving its WebSocket over TLS (`wss://`) with `cert`
    /// (certificate and key PEM, for `localhost`).
    pub async fn start_tls(cert: &(String, String)) -> Prosody {
        Prosody::start_with(false, Some(cert)).await
    }

    async fn start_with(scram_only: bool, cert: Option<&(String, String)>) -> Prosody {
        let dir = Dir::new("prosody");
        if let Some((cert, key)) = cert {
            // Prosody looks for a service's certificate by its name.
            for name in ["https", "localhost"] {
                dir.write(&format!("{name}.crt"), cert);
                dir.write(&format!("{name}.key"), key);
            }
        }
        let http_ports = if cert.is_some() {
            "https_ports"
        } else {
            "http_ports"
        };
        let other_ports = if cert.is_some() {
            "http_ports"
        } else {
            "https_ports"
        };
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let disabled = if scram_only {
            "disable_sasl_mechanisms = { \"PLAIN\" }\n"
        } else {
            ""
        };
        for _ in 0..5 {
            let (http, c2s) = (free_port(), free_port());
            let d = dir.path().display();
            // Run as whoever runs the tests (as root, it would switch to
            // the prosody user, who cannot write here).
            let user = if rustix::process::getuid().is_root() {
                "prosody_user = \"root\"\nprosody_group = \"root\"\nrun_as_root = true\n"
            } else {
                ""
            };
            let config = dir.write(
                "prosody.cfg.lua",
                &format!(
                    "{user}pidfile = \"{d}/prosody.pid\"\ndata_path = \"{d}/data\"\n\
                     certificates = \"{d}\"\n\
                     log = {{ {{ levels = {{ min = \"info\" }}, to = \"file\", filename = \"{d}/prosody.log\" }} }}\n\
                     interfaces = {{ \"127.0.0.1\" }}\nc2s_ports = {{ {c2s} }}\n\
                     {http_ports} = {{ {http} }}\nhttp_interfaces = {{ \"127.0.0.1\" }}\n\
                     https_interfaces = {{ \"127.0.0.1\" }}\n{other_ports} = {{}}\n\
                     s2s_ports = {{}}\nmodules_enabled = {{ \"roster\", \"saslauth\", \"disco\", \"ping\", \"websocket\", \"http\", \"posix\" }}\n\
                     modules_disabled = {{ \"s2s\" }}\nauthentication = \"internal_plain\"\n\
                     c2s_require_encryption = false\nallow_unencrypted_plain_auth = true\n\
                     consider_websocket_secure = true\n{disabled}VirtualHost \"localhost\"\n"
                ),
            );
            let mut command = Command::new("prosody");
            command.arg("--config").arg(&config).arg("-F");
            let install = "Debian's prosody (.ci/run installs it)";
            let mut child = spawn_logged(&mut command, dir.path(), install);
            if listening(&mut child, http).await {
                // The port opens before the WebSocket path is served.
                let log = dir.path().join("prosody.log");
                let serving = async {
                    while !std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains("Serving 'websocket'")
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                };
                if tokio::time::timeout(super::BOUND, serving).await.is_err() {
                    panic!(
                        "prosody did not serve its WebSocket in time:\n{}\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default(),
                        std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
                    );
                }
                return Prosody {
                    dir,
                    config,
                    child,
                    http_port: http,
                    tls: cert.is_some(),
                };
            }
            let _ = child.kill().await;
        }
        panic!(
            "prosody did not start:\n{}",
            std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
        );
    }

    /// `ws://127.0.0.1:PORT/xmpp-websocket` (`wss://localhost:…` with
    /// TLS), for `chat.upstream`.
    pub fn ws_url(&self) -> String {
        match self.tls {
            true => format!("wss://localhost:{}/xmpp-websocket", self.http_port),
            false => format!("ws://127.0.0.1:{}/xmpp-websocket", self.http_port),
        }
    }

    /// Makes (or changes) the account `user@localhost`.
    pub async fn register(&self, user: &str, password: &str) {
        let out = Command::new("prosodyctl")
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, "localhost", password])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "prosodyctl register: {out:?}");
    }

    /// What Prosody logged, for a failing assertion's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
