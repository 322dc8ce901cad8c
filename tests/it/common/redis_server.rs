//! A real `redis-server` for the fleet tests: started on a Unix socket in a
//! temporary directory (no TCP port, nothing persisted), killed, paused
//! (SIGSTOP) and restarted empty by the test.
//!
//! The Debian package `redis-server` provides the binary; `.ci/run`
//! installs it. A missing binary fails the test with that instruction: a
//! fleet test never skips quietly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use ::redis::aio::MultiplexedConnection;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::bounded;

pub struct RedisServer {
    _dir: TempDir,
    socket: PathBuf,
    child: Option<Child>,
    pid: u32,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("redis.sock");
        let (child, pid) = spawn(&dir, &socket).await;
        RedisServer {
            _dir: dir,
            socket,
            child: Some(child),
            pid,
        }
    }

    /// The URL replicas use: `redis+unix://` to the socket.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// Kills the server (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing
    /// answers, as with a hung host.
    pub fn pause(&self) {
        signal("-STOP", self.pid);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal("-CONT", self.pid);
    }

    /// Starts a new, empty server on the same socket (killing the old one
    /// first if it still runs).
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        let (child, pid) = spawn(&self._dir, &self.socket).await;
        self.child = Some(child);
        self.pid = pid;
    }

    pub async fn connection(&self) -> MultiplexedConnection {
        let client = ::redis::Client::open(self.url()).expect("redis URL");
        bounded(
            "a connection to redis-server",
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("connect to redis-server")
    }

    /// Calls per command name since the server started (`INFO
    /// commandstats`), e.g. `{"get": 3, "evalsha": 12}`.
    pub async fn command_calls(&self) -> BTreeMap<String, u64> {
        let mut conn = self.connection().await;
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("INFO commandstats");
        let mut calls = BTreeMap::new();
        for line in info.lines() {
            // cmdstat_get:calls=3,usec=12,...
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, stats)) = rest.split_once(':') else {
                continue;
            };
            let n = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), n);
        }
        calls
    }

    /// Every key and every value in it (hash fields and values, set
    /// members, strings), as raw bytes.
    pub async fn dump(&self) -> Vec<(String, Vec<Vec<u8>>)> {
        let mut conn = self.connection().await;
        let keys: Vec<String> = {
            let mut iter: ::redis::AsyncIter<String> =
                ::redis::AsyncCommands::scan(&mut conn).await.expect("SCAN");
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k.expect("a key"));
            }
            keys
        };
        let mut out = Vec::new();
        for key in keys {
            let kind: String = ::redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("TYPE");
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "string" => vec![::redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("GET")],
                "hash" => ::redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("HGETALL"),
                "zset" => ::redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .expect("ZRANGE"),
                other => panic!("a key of an unexpected type {other}: {key}"),
            };
            out.push((key, values));
        }
        out
    }
}

async fn spawn(dir: &TempDir, socket: &std::path::Path) -> (Child, u32) {
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(socket)
        .args([
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        // Dropping the server (the test ends) kills it, paused or not.
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}): the fleet tests need the Debian package \
                 redis-server (`apt-get install redis-server`; .ci/run installs it)"
            )
        });
    let pid = child.id().expect("a running redis-server");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    bounded("redis-server to accept connections", async {
        loop {
            match lines.next_line().await {
                // "Ready to accept connections" (7.2 on) or "The server is
                // now ready to accept connections at ..." (7.0).
                Ok(Some(line))
                    if line
                        .to_ascii_lowercase()
                        .contains("ready to accept connections") =>
                {
                    break
                }
                Ok(Some(_)) => continue,
                _ => panic!("redis-server exited before it was ready"),
            }
        }
    })
    .await;
    // Keep reading its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, pid)
}

fn signal(which: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .arg(which)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid}");
}
