//! The fleet on highly available and locked-down Redis, all real servers
//! started by the tests: a master failed over by `redis-sentinel`, a
//! 3-master Redis Cluster made by `redis-cli --cluster create`, and a
//! `redis-server` that speaks TLS only and asks for client certificates,
//! or gives qbproxy's user the least ACL the README documents.
//!
//! Debian packages `redis-server`, `redis-sentinel` and `redis-tools`
//! provide the binaries; `.ci/run` installs them. A missing binary fails
//! the test with that instruction: nothing here skips quietly.

use std::process::Stdio;
use std::time::Duration;

use crate::common::certs::{Ca, Dir};
use crate::common::fleet::{self, assert_all_ok, burst_of_300, proxies, statuses, tokens, Load};
use crate::common::{bounded, capture_logs, demo_sim, setup, Harness, Setup};
use http::StatusCode;
use qbproxy_sim::Sim;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A Redis process (server or Sentinel) on a TCP port of loopback, its
/// log read by the test; killed when dropped.
struct Proc {
    child: Child,
    log: Lines<BufReader<ChildStdout>>,
    port: u16,
}

impl Proc {
    /// Starts `program` with the arguments `args` gives for a free port,
    /// and waits for a log line holding `ready`.
    async fn start(program: &str, args: impl Fn(u16) -> Vec<String>, ready: &str) -> Proc {
        // A port another process took between the probe and the bind: try
        // another.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(program)
                .args(args(port))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {program} ({e}): install the Debian packages \
                         redis-server and redis-sentinel (.ci/run does)"
                    )
                });
            let mut log = BufReader::new(child.stdout.take().unwrap()).lines();
            if wait_line(&mut log, ready).await.is_some() {
                return Proc { child, log, port };
            }
        }
        panic!("{program} did not start in five tries");
    }

    /// Waits for a log line holding `what`.
    async fn expect(&mut self, what: &str) -> String {
        wait_line(&mut self.log, what)
            .await
            .unwrap_or_else(|| panic!("the process exited before logging {what:?}"))
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Keeps reading the log, so the process never blocks on a full pipe.
    fn drain(self) -> Child {
        let Proc { child, mut log, .. } = self;
        tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
        child
    }
}

/// The next log line holding `what` (at most [`BOUND`]); `None` if the
/// process exited first.
async fn wait_line(log: &mut Lines<BufReader<ChildStdout>>, what: &str) -> Option<String> {
    bounded(&format!("a log line {what:?}"), async {
        while let Ok(Some(line)) = log.next_line().await {
            if line.contains(what) {
                return Some(line);
            }
        }
        None
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` on loopback that persists nothing; `extra` are more
/// arguments (`{port}` is its port).
async fn redis(dir: &Dir, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(dir.path().display().to_string());
    if !extra.contains(&"--port") {
        args.extend(["--port".into(), "{port}".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let with_port = |port: u16| {
        args.iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect()
    };
    Proc::start("redis-server", with_port, "eady to accept connections").await
}

fn replica_of(sim: &Sim, url: &str, prefix: &str) -> Setup {
    setup()
        .sim(sim.clone())
        .set("cluster", "redis_url", url)
        .set("cluster", "key_prefix", prefix)
        .set("quickblox", "session_timeout", Duration::from_secs(5))
}

async fn three(sim: &Sim, url: &str, prefix: &str) -> [Harness; 3] {
    fleet::three([0, 1, 2].map(|_| replica_of(sim, url, prefix))).await
}

/// An expiry of the fleet's session, then 300 requests: all answered, one
/// creation, one token.
async fn one_creation_per_expiry(sim: &Sim, fleet: &[Harness], when: &str) {
    let before = sim.creations();
    sim.expire_all();
    assert_all_ok(&burst_of_300(fleet).await);
    assert_eq!(sim.creations(), before + 1, "{when}: one creation");
    assert_eq!(tokens(fleet).len(), 1, "{when}: one token");
}

/// Redis Sentinel: qbproxy finds the master through the Sentinel; the
/// master is killed under load and the Sentinel promotes its replica. No
/// request fails, the replicas follow the new master, and the fleet again
/// makes one creation per expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_fails_no_request_and_the_fleet_follows() {
    let dir = Dir::new("sentinel");
    let master = redis(&dir, &[]).await;
    let mut replica = redis(
        &dir,
        &[
            "--dbfilename",
            "replica.rdb",
            "--replicaof",
            "127.0.0.1",
            &master.port.to_string(),
        ],
    )
    .await;
    replica.expect("MASTER <-> REPLICA sync: Finished").await;
    // redis-sentinel rewrites its file: a file per port tried.
    let conf = |port: u16| {
        let text = format!(
            "bind 127.0.0.1\nport {port}\ndir {}\n\
             sentinel monitor qbha 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds qbha 500\n\
             sentinel failover-timeout qbha 5000\n",
            dir.path().display(),
            master.port
        );
        vec![dir.write(&format!("sentinel-{port}.conf"), &text)]
    };
    let mut sentinel = Proc::start("redis-sentinel", conf, "+monitor master qbha").await;
    // The Sentinel knows the replica it will promote.
    sentinel.expect("+slave slave").await;

    let sim = demo_sim().await;
    let url = format!("redis+sentinel://{}/qbha", sentinel.addr());
    let fleet = three(&sim, &url, "sentinel-test").await;
    assert_eq!(sim.creations(), 1, "one creation for the fleet");
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
    }

    let load = Load::start(&proxies(&fleet), 4);
    let old = master.addr();
    master.kill().await;
    let switched = sentinel.expect("+switch-master qbha").await;
    // "+switch-master qbha 127.0.0.1 OLD 127.0.0.1 NEW"
    assert!(
        switched.ends_with(&format!(" {}", replica.port)),
        "{switched}"
    );
    // Every replica answers through the new master again.
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
    }
    let (answers, _) = load.stop().await;
    let counts = statuses(&answers);
    assert_eq!(
        counts.get("200 OK ").copied().unwrap_or(0),
        answers.len(),
        "every request answered 200 through the failover: {counts:?}"
    );
    assert!(answers.len() > 100, "load ran: {}", answers.len());
    for round in 0..2 {
        one_creation_per_expiry(&sim, &fleet, &format!("expiry {round} after the failover")).await;
    }
    // The fleet's session is on the new master, not the dead one's address.
    let mut conn = redis::Client::open(format!("redis://{}", replica.addr()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sentinel-test:s:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?} (old master {old})");
    sentinel.drain();
    replica.drain();
}

/// A real 3-master Redis Cluster: the fleet's keys carry a hash tag, so
/// the scripts that touch an identity's session and lock run (no
/// CROSSSLOT), the client follows the cluster's slot map (no MOVED), and
/// the fleet makes one creation at start and per expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_makes_one_creation_per_expiry() {
    let dir = Dir::new("cluster");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node_dir = Dir::new("cluster-node");
        nodes.push((
            redis(
                &node_dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            .await,
            node_dir,
        ));
    }
    let addrs: Vec<String> = nodes.iter().map(|(n, _)| n.addr()).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli: install the Debian package redis-tools (.ci/run does)");
    let said = String::from_utf8_lossy(&created.stdout).into_owned();
    assert!(
        created.status.success() && said.contains("All 16384 slots covered"),
        "{said}"
    );
    for (node, _) in &mut nodes {
        node.expect("Cluster state changed: ok").await;
    }
    drop(dir);

    let sim = demo_sim().await;
    let url = format!("redis+cluster://{},{}", addrs[0], addrs[1]);
    let fleet = three(&sim, &url, "cluster-test").await;
    assert_eq!(sim.creations(), 1, "one creation for the fleet at start");
    for h in &fleet {
        assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
        assert_eq!(h.metric("qbproxy_cluster_up"), 1);
        h.metric_becomes("qbproxy_cluster_subscribed", 1).await;
    }
    for round in 0..2 {
        one_creation_per_expiry(&sim, &fleet, &format!("expiry {round}")).await;
    }
    for h in &fleet {
        assert_eq!(h.metric("qbproxy_cluster_up"), 1, "no fallback");
    }
    // The session's and the lock's keys share a slot.
    let conn = redis::Client::open(format!("redis://{}", addrs[0]))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let slot = |key: String| {
        let mut conn = conn.clone();
        async move {
            let n: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            n
        }
    };
    let fp = "0123abcd";
    assert_eq!(
        slot(format!("cluster-test:s:{{{fp}}}")).await,
        slot(format!("cluster-test:l:{{{fp}}}")).await
    );
    for (node, _) in nodes {
        node.drain();
    }
}

/// TLS only, client certificates required (`--tls-auth-clients yes`): with
/// `ca_file`, `cert_file` and `key_file` the fleet shares one session;
/// without the client certificate Redis refuses it, and each replica
/// serves alone (says so in the log and `qbproxy_cluster_up`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_client_certificate() {
    let logs = capture_logs();
    let dir = Dir::new("redis-tls");
    let ca = Ca::new("redis test CA");
    let (cert, key) = ca.ecdsa_leaf();
    let ca_file = dir.write("ca.pem", &ca.pem);
    let cert_file = dir.write("server.pem", &cert);
    let key_file = dir.write("server.key", &key);
    let (client_cert, client_key) = ca.ecdsa_leaf();
    let client_cert = dir.write("client.pem", &client_cert);
    let client_key = dir.write("client.key", &client_key);
    std::fs::set_permissions(
        &client_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let server = redis(
        &dir,
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &cert_file,
            "--tls-key-file",
            &key_file,
            "--tls-ca-cert-file",
            &ca_file,
            "--tls-auth-clients",
            "yes",
        ],
    )
    .await;
    let url = format!("rediss://localhost:{}", server.port);
    let sim = demo_sim().await;
    let with_certs = |prefix: &str| {
        replica_of(&sim, &url, prefix)
            .set("cluster", "ca_file", &ca_file)
            .set("cluster", "cert_file", &client_cert)
            .set("cluster", "key_file", &client_key)
    };
    let fleet = fleet::three([0, 1, 2].map(|_| with_certs("tls-test"))).await;
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
    }
    assert_eq!(sim.creations(), 1, "one creation for the fleet over TLS");
    one_creation_per_expiry(&sim, &fleet, "over TLS").await;

    // The CA but no client certificate: refused by Redis; the replica
    // still serves, alone.
    let alone = replica_of(&sim, &url, "tls-no-cert")
        .set("cluster", "ca_file", &ca_file)
        .start()
        .await;
    alone.ready().await;
    assert_eq!(alone.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(alone.metric("qbproxy_cluster_up"), 0);
    assert!(
        logs.has_line(&["Redis is unavailable", "falls back"]),
        "{}",
        logs.text()
    );
    server.drain();
}

/// The least ACL the README documents is enough: the fleet shares one
/// session and hears announcements. A user refused `PSUBSCRIBE`, or a
/// wrong password, is said in the log once, not at every retry (Redis
/// counts the refusals), and the replicas serve on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_least_acl_suffices_and_refusals_are_logged_once() {
    let logs = capture_logs();
    let dir = Dir::new("redis-acl");
    let server = redis(&dir, &[]).await;
    let mut conn = redis::Client::open(format!("redis://{}", server.addr()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // As in the README, with the prefix "acl-test".
    let least = least_acl("acl-test");
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("qbproxy")
        .arg("on")
        .arg(">qb-secret-pw");
    for rule in least.split_whitespace() {
        setuser.arg(rule);
    }
    let _: () = setuser.query_async(&mut conn).await.unwrap();
    // Everything but PSUBSCRIBE.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("deaf")
        .arg("on")
        .arg(">qb-secret-pw")
        .arg("~deaf-test:*")
        .arg("allchannels")
        .arg("+@all")
        .arg("-psubscribe")
        .query_async(&mut conn)
        .await
        .unwrap();

    let sim = demo_sim().await;
    let url = format!("redis://qbproxy:qb-secret-pw@{}", server.addr());
    let fleet = three(&sim, &url, "acl-test").await;
    for h in &fleet {
        h.metric_becomes("qbproxy_cluster_up", 1).await;
        h.metric_becomes("qbproxy_cluster_subscribed", 1).await;
    }
    assert_eq!(sim.creations(), 1);
    one_creation_per_expiry(&sim, &fleet, "under the least ACL").await;

    let deaf_url = format!("redis://deaf:qb-secret-pw@{}", server.addr());
    let deaf = replica_of(&sim, &deaf_url, "deaf-test").start().await;
    deaf.ready().await;
    deaf.metric_becomes("qbproxy_cluster_up", 1).await;
    assert_eq!(deaf.metric("qbproxy_cluster_subscribed"), 0);
    let refusal = ["cannot subscribe", "deaf-test:n:*", "NOPERM"];

    let wrong = format!("redis://qbproxy:not-the-pw@{}", server.addr());
    let locked_out = replica_of(&sim, &wrong, "wrongpass-test").start().await;
    locked_out.ready().await;
    assert_eq!(locked_out.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(locked_out.metric("qbproxy_cluster_up"), 0);
    assert!(
        logs.has_line(&["Redis is unavailable", "AuthenticationFailed"]),
        "{}",
        logs.text()
    );
    let text = logs.text();
    assert!(!text.contains("qb-secret-pw") && !text.contains("not-the-pw"));
    let count = |fragments: &[&str]| {
        logs.text()
            .lines()
            .filter(|l| fragments.iter().all(|f| l.contains(f)))
            .count()
    };
    // Three refused subscriptions and three refused logins later (the
    // listener resubscribes and the heartbeat probes every second), still
    // one line each. Redis counts them.
    bounded("three refusals of each", async {
        loop {
            // Each entry: {count, reason ("auth", "command", ...), ...}.
            let log: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("ACL")
                .arg("LOG")
                .arg(100)
                .query_async(&mut conn)
                .await
                .unwrap();
            let refused = |reason: &str| -> i64 {
                log.iter()
                    .filter(|e| {
                        e.get("reason")
                            .and_then(|r| redis::from_redis_value_ref::<String>(r).ok())
                            == Some(reason.to_owned())
                    })
                    .filter_map(|e| redis::from_redis_value_ref::<i64>(e.get("count")?).ok())
                    .sum()
            };
            if refused("command") >= 3 && refused("auth") >= 3 {
                return;
            }
            // Polling Redis's counters, not standing in for them.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(deaf.metric("qbproxy_cluster_subscribed"), 0);
    assert_eq!(count(&refusal), 1, "{}", logs.text());
    assert_eq!(
        count(&["Redis is unavailable", "AuthenticationFailed"]),
        1,
        "{}",
        logs.text()
    );
    server.drain();
}

/// The least ACL for `key_prefix` `prefix`, read from the README (so the
/// README's is what is tested).
fn least_acl(prefix: &str) -> String {
    let readme = include_str!("../../README.md");
    let line = readme
        .lines()
        .find(|l| l.contains("ACL SETUSER qbproxy"))
        .expect("the README documents the least ACL (ACL SETUSER qbproxy ...)");
    let rules = line
        .split_once(">PASSWORD")
        .expect("the README's ACL line sets >PASSWORD")
        .1
        .trim()
        .trim_end_matches('`');
    rules.replace("qbproxy:", &format!("{prefix}:"))
}
