//! The binary: `check`, config errors before binding, and a real process
//! that serves and stops on SIGTERM.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use qbproxy_sim::{Sim, SimConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_qbproxy");

/// A temporary directory for one test's files, removed with it.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(name: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("qbproxy-cli-{name}-"))
                .tempdir()
                .unwrap(),
        )
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

const GOOD: &str = r#"
[listen]
addr = "127.0.0.1:8080"
[admin]
addr = "127.0.0.1:9090"
[upstream]
url = "https://api.quickblox.com"
[quickblox]
application_id = "76730"
auth_key = "7quWEh-k6TqghXe"
auth_secret_env = "QBPROXY_CLI_TEST_SECRET"
[[identity]]
name = "bot"
login = "bot"
password_env = "QBPROXY_CLI_TEST_PASSWORD"
"#;

fn check(config: &PathBuf) -> std::process::Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .env("QBPROXY_CLI_TEST_SECRET", "s3cr3t")
        .env("QBPROXY_CLI_TEST_PASSWORD", "pw")
        .output()
        .unwrap()
}

#[test]
fn check_accepts_a_good_config() {
    let dir = TempDir::new("good");
    let out = check(&dir.file("config.toml", GOOD));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(!stdout.contains("s3cr3t"));
}

/// Files a config names by a relative path are found in the config's
/// folder, whatever the working directory; `check` prints where it found
/// each.
#[test]
fn relative_paths_are_taken_from_the_configs_folder() {
    let dir = TempDir::new("relative");
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::create_dir_all(dir.path().join("var")).unwrap();
    dir.file("secrets/auth_secret", "s3cr3t\n");
    dir.file("secrets/bot", "pw\n");
    let text =
        GOOD.replace(
            "auth_secret_env = \"QBPROXY_CLI_TEST_SECRET\"",
            "auth_secret_file = \"secrets/auth_secret\"",
        )
        .replace(
            "password_env = \"QBPROXY_CLI_TEST_PASSWORD\"",
            "password_file = \"./secrets/bot\"",
        ) + "[state]\nfile = \"var/sessions\"\n";
    let config = dir.file("config.toml", &text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    let folder = dir.path().canonicalize().unwrap();
    for (key, file) in [
        ("quickblox.auth_secret_file", "secrets/auth_secret"),
        ("identity[0].password_file", "./secrets/bot"),
        ("state.file", "var/sessions"),
    ] {
        let line = format!("  {key}: {}", folder.join(file).display());
        assert!(stdout.contains(&line), "{line} in\n{stdout}");
    }
}

/// The process marks itself not dumpable before it reads a secret (no core
/// file, no reading of its memory by another process of the same user).
#[test]
fn the_process_is_not_dumpable() {
    let dir = TempDir::new("dumpable");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.file("config.toml", GOOD))
        .env("QBPROXY_CLI_TEST_SECRET", "s3cr3t")
        .env("QBPROXY_CLI_TEST_PASSWORD", "pw")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("not dumpable: no core file"), "{log}");
    assert!(!log.contains("could not mark the process"), "{log}");
}

#[test]
fn check_names_the_key_and_exits_64() {
    let dir = TempDir::new("bad");
    let cases = [
        (
            GOOD.replace("[upstream]\n", "[upstream]\ntimout = \"1s\"\n"),
            "upstream.timout",
        ),
        (
            GOOD.replace("QBPROXY_CLI_TEST_SECRET", "QBPROXY_CLI_TEST_UNSET"),
            "quickblox.auth_secret_env",
        ),
        (
            GOOD.replace("127.0.0.1:9090", "127.0.0.1:8080"),
            "admin.addr",
        ),
        (
            GOOD.replace("https://api.quickblox.com", "api.quickblox.com"),
            "upstream.url",
        ),
        (
            GOOD.replace("login = \"bot\"\n", ""),
            "identity[0].password",
        ),
        ("[quickblox\n".to_owned(), "line 1"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let out = check(&dir.file(&format!("c{i}.toml"), text));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    let out = check(&dir.path().join("missing.toml"));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// One run of `check` lists every problem it finds, a line each, across
/// sections and across identities: a person fixes them all at once.
#[test]
fn check_lists_every_problem_it_finds() {
    let dir = TempDir::new("several");
    let text = GOOD
        .replace("127.0.0.1:9090", "127.0.0.1:8080")
        .replace("https://api.quickblox.com", "api.quickblox.com")
        .replace("QBPROXY_CLI_TEST_SECRET", "QBPROXY_CLI_TEST_UNSET")
        .replace("login = \"bot\"\n", "")
        + "[[identity]]\nname = \"bot\"\nlogin = \"other\"\npassword = \"pw\"\n";
    let out = check(&dir.file("several.toml", &text));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    for key in [
        "admin.addr",
        "upstream.url",
        "quickblox.auth_secret_env",
        "identity[0].password",
        "identity[1].name",
    ] {
        let found = lines
            .iter()
            .filter(|l| l.contains(&format!(": {key}")))
            .count();
        assert_eq!(found, 1, "{key}, a line of its own: {stderr}");
    }
    assert_eq!(lines.len(), 5, "{stderr}");
}

#[test]
fn serving_with_a_bad_config_exits_64_before_binding() {
    let dir = TempDir::new("serve-bad");
    let cfg = dir.file(
        "config.toml",
        &GOOD.replace("[upstream]\n", "[upstream]\nbogus = 1\n"),
    );
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.bogus"));
}

/// The address in a "listening" log line (text or JSON) for `listener`
/// ("proxy" or "admin"): the binary binds port 0 and says what it got, so
/// no test guesses a free port.
fn listening_on(line: &str, listener: &str) -> Option<std::net::SocketAddr> {
    if !line.contains("listening") || !line.contains(&format!("\"{listener}\"")) {
        return None;
    }
    let at = line.find("addr")? + "addr".len();
    line[at..]
        .trim_start_matches(['=', '"', ':'])
        .split(|c: char| c == '"' || c.is_whitespace() || c == ',')
        .next()?
        .parse()
        .ok()
}

/// Reads log lines until both listeners said where they listen.
async fn listening(lines: &mut LogLines) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = wait_for(lines, "listening").await;
        proxy = proxy.or(listening_on(&line, "proxy"));
        admin = admin.or(listening_on(&line, "admin"));
    }
    (proxy.unwrap(), admin.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_then_drains_on_sigterm() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let app = sim.config().clone();
    let dir = TempDir::new("sigterm");
    let cfg = dir.file(
        "config.toml",
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[quickblox]\napplication_id = \"{}\"\nauth_key = \"{}\"\n\
             auth_secret_file = {:?}\n",
            sim.url(),
            app.application_id,
            app.auth_key,
            dir.file("secret", &format!("{}\n", app.auth_secret))
                .display()
                .to_string(),
        ),
    );
    // One thread: no proxy workers past the main runtime (the other
    // binary tests run one per CPU).
    let (mut child, mut lines) =
        serve(&cfg, &["--log-format", "json"], &[("QBPROXY_THREADS", "1")]);
    let mut log = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let created = line.contains("session created");
            log.push(line);
            if created {
                return;
            }
        }
        panic!("qbproxy exited early: {log:?}");
    });
    ready.await.expect("qbproxy logs its first session");
    // JSON logs: every line parses.
    for line in &log {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }

    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let proxy = log
        .iter()
        .find_map(|l| listening_on(l, "proxy"))
        .expect("the proxy's address is logged");
    let uri: http::Uri = format!("http://{proxy}/users.json").parse().unwrap();
    let resp = client.get(uri).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.requests().len(), 1);

    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
    while let Some(line) = lines.next_line().await.unwrap() {
        log.push(line);
    }
    let all = log.join("\n");
    assert!(all.contains("SIGTERM received"), "{all}");
    assert!(all.contains(r#""threads":1"#), "{all}");
    assert!(all.contains("all connections drained"), "{all}");
    // The access log is JSON like the rest, one event for the request,
    // and written out (from the log's buffer) before the process exits.
    let events: Vec<serde_json::Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v: &serde_json::Value| v["target"] == "qbproxy::access")
        .collect();
    assert_eq!(events.len(), 1, "{all}");
    let e = &events[0];
    assert_eq!(e["method"], "GET");
    assert_eq!(e["path"], "/users.json");
    assert_eq!(e["status"], 200);
    assert_eq!(e["identity"], "app");
    assert_eq!(e["replayed"], false);
    assert_eq!(e["complete"], true);
    assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    assert!(e["bytes_out"].as_u64().unwrap() > 0, "{e}");
    assert!(e["upstream_ms"].as_f64().unwrap() > 0.0, "{e}");
    assert!(
        e["duration_ms"].as_f64() >= e["upstream_ms"].as_f64(),
        "{e}"
    );
    assert!(e["timestamp"].is_string(), "{e}");
}

/// The documented example stays valid as the config grows.
#[test]
fn the_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let out = Command::new(BIN)
        .args(["check", "--config", example])
        .env("QB_AUTH_SECRET", "s3cr3t")
        .env("QB_BOT_PASSWORD", "pw")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qbproxy demo` as a new user runs it: wait for the printed instructions,
/// do what they say, stop with Ctrl-C (SIGINT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_works_as_printed() {
    demo_as_printed(false).await;
}

/// `demo --tls`, for the official SDKs (HTTPS only): the printed URL is
/// https, and the printed CA is all a client needs to trust it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_demo_works_as_printed_with_the_ca_it_prints() {
    demo_as_printed(true).await;
}

async fn demo_as_printed(tls: bool) {
    use tokio::io::AsyncReadExt;
    let mut args = vec![
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--chat",
        "127.0.0.1:0",
        "--chat-tcp",
        "127.0.0.1:0",
    ];
    if tls {
        args.push("--tls");
    }
    let mut child = tokio::process::Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = out.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops the demo") {
                return;
            }
        }
        panic!("demo exited early: {printed}");
    })
    .await
    .expect("the demo prints its instructions");

    let printed_url = |what: &str| {
        printed
            .lines()
            .find_map(|l| l.trim().strip_prefix(what))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("the {what} URL is printed"))
            .to_owned()
    };
    let proxy = printed_url("proxy");
    let admin = printed_url("admin");
    let sim = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("simulator"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the simulator URL is printed")
        .to_owned();
    for url in [&proxy, &sim, &admin] {
        assert!(printed.contains(url.as_str()), "{url} in\n{printed}");
    }

    // Trusting only what the demo printed (no system roots).
    let mut roots = rustls::RootCertStore::empty();
    let mut printed_ca = None;
    if tls {
        assert!(proxy.starts_with("https://"), "{printed}");
        let ca = printed_url("ca");
        printed_ca = Some(ca.clone());
        let line = format!("NODE_EXTRA_CA_CERTS={ca}");
        assert!(printed.contains(&line), "{line} in\n{printed}");
        assert!(
            printed.contains(&format!("curl --cacert {ca} -s")),
            "{printed}"
        );
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    } else {
        assert!(proxy.starts_with("http://"), "{printed}");
    }
    let tls_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let call = |method: &str, url: String, body: &'static str| {
        let req = http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (s, b) = call("GET", format!("{proxy}/users.json?page=1&per_page=10"), "").await;
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"user_id\":1001"), "{b}");
    let (s, _) = call(
        "POST",
        format!("{proxy}/chat/Dialog.json"),
        r#"{"type":2,"name":"demo"}"#,
    )
    .await;
    assert_eq!(s, 200);
    // Chat, printed beside proxy (and ca): XMPP over WebSocket (wss with
    // --tls) and over TCP; an XMPP client logs in there as the held users.
    let chat = printed_url("chat");
    let chat_tcp = printed_url("chat-tcp");
    let ws_scheme = if tls { "wss://" } else { "ws://" };
    assert!(chat.starts_with(ws_scheme), "{printed}");
    let chat_tcp: std::net::SocketAddr = chat_tcp.parse().expect("chat-tcp host:port");
    if !tls {
        let (_c, jid) =
            crate::common::xmpp::Xmpp::login(&chat, "localhost", "1002-76730", "any", "cli")
                .await
                .expect("the demo's second user chats through qbproxy");
        assert_eq!(jid, "1002-76730@localhost/cli");
        crate::common::xmpp::XmppTcp::login(chat_tcp, "1001-76730", "any", "cli", None).await;
    }
    // The printed file line, run by the real curl: the new file's upload
    // URL names qbproxy where the demo said.
    let uploads = printed_url("uploads");
    assert_eq!(uploads, proxy, "{printed}");
    let line = printed
        .lines()
        .map(str::trim)
        .find(|l| l.contains("/blobs.json"))
        .unwrap_or_else(|| panic!("a /blobs.json line in\n{printed}"));
    let out = tokio::process::Command::new("sh")
        .args(["-c", line])
        .output()
        .await
        .unwrap();
    let blob: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{line}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let url = blob["blob"]["blob_object_access"]["params"]
        .as_str()
        .unwrap_or("");
    assert!(
        url.starts_with(&format!("{uploads}/blobs/")),
        "{line}: {url}"
    );
    let (s, b) = call("POST", format!("{sim}/_sim/expire"), "").await;
    // The demo holds two users (demo and other), so that two may chat.
    assert_eq!((s, b.as_str()), (200, r#"{"expired":2}"#));
    let (s, _) = call("GET", format!("{proxy}/users.json?page=1&per_page=10"), "").await;
    assert_eq!(s, 200, "renewed and replayed");
    let (s, _) = call("DELETE", format!("{proxy}/session.json"), "").await;
    assert_eq!(s, 403);
    let (s, _) = call("DELETE", format!("{proxy}//x/../Session.json"), "").await;
    assert_eq!(s, 403);
    // The printed line, run as printed by the real curl: without
    // `--path-as-is` curl would tidy the path up itself and show nothing.
    let line = printed
        .lines()
        .map(str::trim)
        .find(|l| l.contains("--path-as-is"))
        .unwrap_or_else(|| panic!("a --path-as-is line in\n{printed}"));
    let out = tokio::process::Command::new("sh")
        .args(["-c", line])
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.starts_with("HTTP/") && shown.contains(" 403") && shown.contains("shared-session"),
        "{line}: {shown}"
    );
    let (s, b) = call("GET", format!("{proxy}/session.json"), "").await;
    assert_eq!(s, 200);
    assert!(
        b.contains("\"user_id\":1001") && !b.contains("token"),
        "{b}"
    );
    let (s, b) = call("GET", format!("{admin}/metrics"), "").await;
    assert_eq!(s, 200);
    assert!(
        b.contains("qbproxy_replays_total{identity=\"demo\",pool=\"\"} 1"),
        "{b}"
    );

    signal(&child, "INT");
    exits_cleanly(&mut child).await;
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(err.contains("SIGINT received"), "{err}");
    assert!(
        err.contains("reason=\"expired\""),
        "one log line for the renewal: {err}"
    );
    if let Some(ca) = printed_ca {
        let dir = std::path::Path::new(&ca).parent().unwrap();
        assert!(!dir.exists(), "the demo's certificates go with it");
    }
}

/// A config for `sim`, both listeners on port 0 (the binary logs where).
fn on_port_0(sim: &Sim) -> String {
    let app = sim.config();
    format!(
        "[listen]\naddr = \"127.0.0.1:0\"\nshutdown_delay = \"0s\"\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[quickblox]\napplication_id = \"{}\"\nauth_key = \"{}\"\nauth_secret = \"{}\"\n",
        sim.url(),
        app.application_id,
        app.auth_key,
        app.auth_secret,
    )
}

/// SIGHUP on the real binary: a valid new config applies at once (a new
/// client key works); an invalid one is refused and the old one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_valid_config_and_refuses_an_invalid_one() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("sighup");
    let base = on_port_0(&sim);
    let key_a = "[[client]]\nname = \"a\"\nkey = \"client-a-key-0123456789\"\n";
    let key_b = "[[client]]\nname = \"b\"\nkey = \"client-b-key-0123456789\"\n";
    let cfg = dir.file("config.toml", &format!("{base}{key_a}"));
    let (child, mut lines) = serve(&cfg, &[], &[]);
    let (proxy, _) = listening(&mut lines).await;
    wait_for(&mut lines, "session created").await;

    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let get = |key: &'static str| {
        let req = http::Request::get(format!("http://{proxy}/users.json"))
            .header("QBProxy-Key", key)
            .body(http_body_util::Empty::new())
            .unwrap();
        let client = client.clone();
        async move { client.request(req).await.unwrap().status().as_u16() }
    };
    let hup = |child: &tokio::process::Child| signal(child, "HUP");
    assert_eq!(get("client-b-key-0123456789").await, 401);

    std::fs::write(&cfg, format!("{base}{key_a}{key_b}")).unwrap();
    hup(&child);
    wait_for(&mut lines, "configuration reloaded").await;
    assert_eq!(get("client-b-key-0123456789").await, 200);

    std::fs::write(&cfg, format!("{base}{key_a}[upstream]\nbogus = 1\n")).unwrap();
    hup(&child);
    let refused = wait_for(&mut lines, "reload refused").await;
    assert!(refused.contains("running configuration stays"), "{refused}");
    assert_eq!(
        get("client-b-key-0123456789").await,
        200,
        "the old configuration serves on"
    );
    assert_eq!(get("client-a-key-0123456789").await, 200);
}

/// `--threads 2` on the real binary: two proxy workers on one port, each
/// serving its share of 24 connections (the chance that one gets none is
/// 2^-23), and each draining on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_2_runs_two_proxy_workers_on_one_port() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("workers");
    let cfg = dir.file("config.toml", &on_port_0(&sim));
    let (mut child, mut lines) = serve(&cfg, &["--threads", "2"], &[]);
    // Both workers and the admin listener say where they listen.
    let (mut proxies, mut admin) = (Vec::new(), None);
    while proxies.len() < 2 || admin.is_none() {
        let line = wait_for(&mut lines, "listening").await;
        proxies.extend(listening_on(&line, "proxy"));
        admin = admin.or(listening_on(&line, "admin"));
    }
    let (proxy, admin) = (proxies[0], admin.unwrap());
    assert_eq!(proxies[1], proxy, "one port for both workers");
    wait_for(&mut lines, "session created").await;

    for i in 0..24 {
        let request =
            format!("GET /data/Spread/{i}.json HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n");
        let answer = common::raw(proxy, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let metrics = common::raw(
        admin,
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let served = |w: u32| {
        common::metric(
            &metrics,
            &format!("qbproxy_worker_requests_total{{worker=\"{w}\"}}"),
        )
    };
    assert_eq!(served(0) + served(1), 24, "{metrics}");
    assert!(served(0) > 0 && served(1) > 0, "{metrics}");

    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
    let mut drained = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.contains("all connections drained") && line.contains(r#"listener="proxy""#) {
            drained.push(line);
        }
    }
    assert_eq!(drained.len(), 2, "{drained:?}");
    assert!(
        drained.iter().any(|l| l.contains("worker=1")),
        "{drained:?}"
    );
}

/// qbproxy's log, line by line.
type LogLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// `qbproxy --config CFG ARGS…` serving at `RUST_LOG=info` with `env` set,
/// and its log (killed when dropped).
fn serve(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> (tokio::process::Child, LogLines) {
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// The first log line containing `what`, waiting at most 20 s.
async fn wait_for(lines: &mut LogLines, what: &str) -> String {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(what) {
                return line;
            }
        }
        panic!("qbproxy exited before logging {what:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line {what:?}"))
}

/// Waits (at most 20 s) until a line containing each of `what` was
/// logged, in any order.
async fn wait_for_all(lines: &mut LogLines, what: &[&str]) {
    let mut missing: Vec<&str> = what.to_vec();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            missing.retain(|w| !line.contains(w));
            if missing.is_empty() {
                return;
            }
        }
        panic!("qbproxy exited before logging {missing:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log lines {what:?}"))
}

/// Sends `kill -SIG` to the child.
fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits (at most 20 s) for the child to exit with status 0.
async fn exits_cleanly(child: &mut tokio::process::Child) {
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("qbproxy exits after the signal")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn config_errors_never_echo_a_secret_and_loose_permissions_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("secrets");
    let out = check(&dir.file(
        "c.toml",
        &GOOD.replace(
            "auth_secret_env = \"QBPROXY_CLI_TEST_SECRET\"",
            "auth_secret = 98765432109876",
        ),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("quickblox.auth_secret"), "{stderr}");
    assert!(!stderr.contains("98765432109876"), "{stderr}");
    // A secret file others may read: a warning, and still exit 0.
    let secret = dir.file("secret", "s3cr3t\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.file(
        "w.toml",
        &GOOD.replace(
            "auth_secret_env = \"QBPROXY_CLI_TEST_SECRET\"",
            &format!("auth_secret_file = {:?}", secret.display().to_string()),
        ),
    );
    let out = check(&cfg);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: quickblox.auth_secret_file: other users may read"),
        "{stderr}"
    );
}

/// Starts the binary through `sh` with `ulimit` options first, and returns
/// its stderr lines once it logs that it is listening.
async fn start_with_ulimit(
    ulimit: &str,
    config: &std::path::Path,
) -> (tokio::process::Child, LogLines) {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ulimit}; exec \"$0\" --config \"$1\""))
        .arg(BIN)
        .arg(config)
        .env("QBPROXY_CLI_TEST_SECRET", "s3cr3t")
        .env("QBPROXY_CLI_TEST_PASSWORD", "pw")
        .env("QBPROXY_THREADS", "1")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_open_file_limit_is_raised_and_a_short_one_is_warned_about() {
    let hard: u64 = String::from_utf8(
        Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(0);
    let dir = TempDir::new("nofile");
    let good = GOOD
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let cfg = dir.file("config.toml", &good);
    // A low soft limit under a higher hard one: raised to the hard one.
    if hard > 512 {
        let (mut child, mut lines) = start_with_ulimit("ulimit -Sn 256", &cfg).await;
        let line = wait_for(&mut lines, "raised the open-file limit").await;
        assert!(line.contains("from=256"), "{line}");
        wait_for(&mut lines, "listening").await;
        assert_eq!(soft_open_files(child.id().unwrap()), hard);
        signal(&child, "TERM");
        exits_cleanly(&mut child).await;
    }
    // A hard limit below 4096 + 256 connections: a warning at start.
    let (mut child, mut lines) = start_with_ulimit("ulimit -n 1024", &cfg).await;
    let line = wait_for(&mut lines, "do not fit under the open-file limit").await;
    assert!(line.contains("limit=1024"), "{line}");
    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
}

// The first hour: what a new user runs -----------------------------------

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("QBPROXY_THREADS")
        .output()
        .unwrap()
}

#[test]
fn subcommands_refuse_options_that_do_not_apply_to_them() {
    for (args, says) in [
        (&["demo", "--config", "x.toml"][..], "--config"),
        (&["sim", "--config", "x.toml"], "--config"),
        (
            &["--config", "x.toml", "demo"],
            "reads no configuration file",
        ),
        (
            &["--config", "x.toml", "sim"],
            "reads no configuration file",
        ),
        (
            &["--config", "x.toml", "check"],
            "qbproxy check --config FILE",
        ),
        (&["--threads", "2", "check"], "runs no proxy"),
        (&["check", "--threads", "2"], "--threads"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn help_says_what_no_subcommand_does_and_check_lists_only_its_options() {
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    assert!(
        help.contains("With no subcommand, qbproxy runs the proxy"),
        "{help}"
    );
    assert!(help.contains("SIGHUP reloads"), "{help}");
    let check = String::from_utf8(run(&["check", "--help"]).stdout).unwrap();
    assert!(
        check.contains("--config") && check.contains("--probe"),
        "{check}"
    );
    assert!(!check.contains("--threads"), "{check}");
    let demo = String::from_utf8(run(&["demo", "--help"]).stdout).unwrap();
    assert!(
        demo.contains("--threads") && demo.contains("--tls"),
        "{demo}"
    );
    assert!(!demo.contains("--config"), "{demo}");
}

#[test]
fn check_summarises_pools() {
    let dir = TempDir::new("pools");
    let cfg = dir.file(
        "config.toml",
        &format!(
            "{GOOD}[[pool]]\nname = \"load\"\nlogin = \"load-{{n}}\"\ncount = 500\npassword = \"pw-{{n}}\"\n"
        ),
    );
    let out = check(&cfg);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("identities: bot; pools: load (500 members)"),
        "{said}"
    );
    assert!(!said.contains("load-2"), "members are not listed: {said}");
}

/// A config in front of `sim` with a good identity, one with a wrong
/// password, and a pool of three.
fn probe_config(dir: &TempDir, sim: &Sim, wrong: bool) -> PathBuf {
    let app = sim.config();
    let bad = if wrong {
        "[[identity]]\nname = \"typo\"\nlogin = \"demo\"\npassword = \"demo-pasword\"\n\
         [[identity]]\nname = \"revoked\"\napi_key = \"revoked-api-key\"\n"
    } else {
        ""
    };
    dir.file(
        "config.toml",
        &format!(
            "[upstream]\nurl = \"{}\"\n[quickblox]\napplication_id = \"{}\"\nauth_key = \"{}\"\n\
             auth_secret = \"{}\"\n[[identity]]\nname = \"app\"\n\
             [[identity]]\nname = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n\
             [[identity]]\nname = \"svc\"\napi_key = \"demo-api-key\"\non_behalf_of = 1002\n{bad}\
             [[pool]]\nname = \"load\"\nlogin = \"loadtest-{{n}}\"\ncount = 3\npassword = \"pw-{{n}}\"\n",
            sim.url(),
            app.application_id,
            app.auth_key,
            app.auth_secret,
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_probe_creates_one_session_per_identity_and_says_each_result() {
    let sim = Sim::start(SimConfig::demo().with_users("loadtest-{n}", "pw-{n}", 1..=3))
        .await
        .unwrap();
    let dir = TempDir::new("probe");

    let good = probe_config(&dir, &sim, false);
    let out = tokio::task::spawn_blocking(move || {
        run(&["check", "--probe", "--config", good.to_str().unwrap()])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("probe app: ok (application session)"),
        "{said}"
    );
    assert!(said.contains("probe demo: ok (user 1001)"), "{said}");
    for n in 1..=3 {
        let line = format!("probe load (member load-{n}): ok (user {})", 100_000 + n);
        assert!(said.contains(&line), "{line} in {said}");
    }
    assert!(
        said.contains("probe svc: ok (API key, on behalf of user 1002)"),
        "{said}"
    );
    assert!(said.contains("probe: all 6 succeeded"), "{said}");
    assert_eq!(
        sim.creations(),
        5,
        "one creation each, every member of the pool, none for the API key"
    );
    let read = sim.requests();
    assert_eq!(read.len(), 1, "one read for the API key");
    assert_eq!(read[0].path_and_query, "/users/1002.json");
    assert_eq!(read[0].headers["authorization"], "ApiKey demo-api-key");
    assert_eq!(read[0].headers["on-behalf-of"], "1002");

    let wrong = probe_config(&dir, &sim, true);
    let out = tokio::task::spawn_blocking(move || {
        run(&["check", "--probe", "--config", wrong.to_str().unwrap()])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    let typo = said
        .lines()
        .find(|l| l.starts_with("probe typo:"))
        .unwrap_or_else(|| panic!("a line for typo: {said}"));
    assert!(
        typo.contains("FAILED") && typo.contains("Unauthorized") && typo.contains("401"),
        "{typo}"
    );
    // QuickBlox says only "Unauthorized": the line names what was sent
    // (the auth key's first characters) and what else to check.
    assert!(
        typo.contains("QuickBlox refused application_id \"76730\", auth_key demo…")
            && typo.contains("user login")
            && typo.contains("upstream.url"),
        "{typo}"
    );
    assert!(
        said.contains("probe demo: ok"),
        "the others still probed: {said}"
    );
    let revoked = said
        .lines()
        .find(|l| l.starts_with("probe revoked:"))
        .unwrap_or_else(|| panic!("a line for revoked: {said}"));
    assert!(
        revoked.contains("FAILED") && revoked.contains("Unauthorized") && revoked.contains("401"),
        "{revoked}"
    );
    assert!(said.contains("probe: 2 of 8 failed"), "{said}");
    assert!(!said.contains("demo-pasword"), "no password in the output");
    assert!(!said.contains("revoked-api-key"), "no key in the output");
}

/// `deploy/qbproxy.service` stays valid and hardened: `systemd-analyze
/// verify` accepts it (with this build as the binary), and `systemd-analyze
/// security` rates its exposure at 1.5 or less (of 10).
#[test]
fn the_systemd_unit_verifies_and_stays_hardened() {
    let dir = TempDir::new("systemd");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/qbproxy.service"
    ))
    .unwrap();
    for needed in [
        "LimitCORE=0",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "LoadCredential=",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
    let path = dir.file(
        "qbproxy.service",
        &unit.replace("/usr/local/bin/qbproxy", BIN),
    );
    // The socket units (socket activation) name the proxy's and the admin's
    // descriptors as qbproxy tells them apart, and start this service.
    let mut sockets = Vec::new();
    for (name, fd_name) in [
        ("qbproxy.socket", "proxy"),
        ("qbproxy-admin.socket", "admin"),
    ] {
        let text = std::fs::read_to_string(format!("{}/deploy/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        assert!(
            text.contains(&format!("\nFileDescriptorName={fd_name}\n")),
            "{name}"
        );
        assert!(text.contains("\nService=qbproxy.service\n"), "{name}");
        sockets.push(dir.file(name, &text));
    }
    let run = |args: &[&str], units: &[&std::path::Path]| {
        Command::new("systemd-analyze")
            .args(args)
            .args(units)
            .output()
            .expect("systemd-analyze: install Debian's systemd (.ci/run does)")
    };
    let verify = run(&["verify"], &[&path, &sockets[0], &sockets[1]]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = run(&["security", "--offline=true", "--threshold=15"], &[&path]);
    assert!(
        security.status.success(),
        "{}",
        String::from_utf8_lossy(&security.stdout)
    );
}

/// Requests sent without pause by `clients` tasks until stopped: each
/// task alternates a kept-alive client (hyper's pool) and a new connection
/// per request. Counts answers 200 and everything else.
struct Load {
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One request on a new connection, its whole answer; errors returned.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl Load {
    fn start(proxy: std::net::SocketAddr, clients: usize) -> Load {
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let tasks = (0..clients)
            .map(|i| {
                let (ok, failed, stopping) = (ok.clone(), failed.clone(), stopping.clone());
                tokio::spawn(async move {
                    let kept: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
                        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                            .build(hyper_util::client::legacy::connect::HttpConnector::new());
                    let mut n = 0u64;
                    while !*stopping.borrow() {
                        n += 1;
                        let outcome = if (n + i as u64) % 2 == 0 {
                            let uri: http::Uri =
                                format!("http://{proxy}/users.json?c={i}&n={n}").parse().unwrap();
                            match kept.get(uri).await {
                                Ok(r) if r.status() == 200 => {
                                    use http_body_util::BodyExt;
                                    r.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string())
                                }
                                Ok(r) => Err(format!("status {}", r.status())),
                                Err(e) => Err(format!("{e:?}")),
                            }
                        } else {
                            let request = format!(
                                "GET /users.json?c={i}&n={n} HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n"
                            );
                            match raw(proxy, request.as_bytes()).await {
                                Ok(a) if a.starts_with("HTTP/1.1 200") => Ok(()),
                                Ok(a) => Err(a.lines().next().unwrap_or("no answer").to_owned()),
                                Err(e) => Err(format!("new connection: {e}")),
                            }
                        };
                        match outcome {
                            Ok(()) => ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                            Err(e) => {
                                failed.lock().unwrap().push(e);
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` further requests were answered 200.
    async fn answered(&self, more: u64) {
        let until = self.ok() + more;
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.ok() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("requests go on being answered");
    }

    /// Stops and returns (answered 200, failures).
    async fn stop(self) -> (u64, Vec<String>) {
        let _ = self.stop.send(true);
        let ok = self.ok();
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (
            ok.max(self.ok.load(std::sync::atomic::Ordering::Relaxed)),
            failed,
        )
    }
}

/// The in-place upgrade: a second qbproxy started with the same config
/// takes the listening sockets over through `listen.handover_socket` while
/// requests keep coming; the first writes its sessions to the state file,
/// hands over, drains and exits 0. No request fails, no session is created
/// for the new process, and the new one serves on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_the_sockets_over_and_loses_no_request() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let app = sim.config().clone();
    let dir = TempDir::new("upgrade");
    let socket = dir.path().join("handover.sock");
    let state = dir.path().join("sessions.json");
    let cfg = dir.file(
        "config.toml",
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\nshutdown_delay = \"1s\"\nhandover_socket = {:?}\n\
             [admin]\naddr = \"127.0.0.1:0\"\n[state]\nfile = {:?}\n\
             [upstream]\nurl = \"{}\"\n[quickblox]\napplication_id = \"{}\"\nauth_key = \"{}\"\nauth_secret = \"{}\"\n",
            socket.display().to_string(),
            state.display().to_string(),
            sim.url(),
            app.application_id,
            app.auth_key,
            app.auth_secret,
        ),
    );
    let (mut old, mut old_log) = serve(&cfg, &["--threads", "2"], &[]);
    let (proxy, admin) = listening(&mut old_log).await;
    wait_for_all(
        &mut old_log,
        &["session created", "takes over from this one"],
    )
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "only its user may connect"
    );

    let load = Load::start(proxy, 8);
    load.answered(200).await;
    let (mut new, mut new_log) = serve(&cfg, &["--threads", "2"], &[]);
    let took = wait_for(&mut new_log, "taking over the listening sockets").await;
    assert!(
        took.contains(&format!("pid={}", old.id().unwrap())),
        "{took}"
    );
    let (new_proxy, new_admin) = listening(&mut new_log).await;
    assert_eq!((new_proxy, new_admin), (proxy, admin), "the same sockets");
    // In the order its tasks log them: no line is skipped looking for another.
    wait_for_all(
        &mut new_log,
        &[
            "restored from the state file",
            "ready: the process taken over from",
            "takes over from this one",
        ],
    )
    .await;
    wait_for(&mut old_log, "handed over").await;
    exits_cleanly(&mut old).await;
    let mut rest = Vec::new();
    while let Some(line) = old_log.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(
        rest.iter()
            .any(|l| l.contains("all connections drained") && l.contains("\"proxy\"")),
        "{rest:#?}"
    );
    // The old process is gone: what is answered now, the new one answers.
    load.answered(200).await;
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert_eq!(sim.creations(), 1, "the new process logged nobody in");
    // The new process offers the handover in turn, on the same path.
    assert!(socket.exists());
    signal(&new, "TERM");
    exits_cleanly(&mut new).await;
    assert!(!socket.exists(), "removed by its last owner");
}

/// `[chat]`'s listeners go with the upgrade too: the new process takes the
/// WebSocket and TCP chat sockets over with the proxy's (the old one still
/// holds those ports, so binding them again would fail or, on port 0,
/// move), and once the old one has drained users log in to chat on the
/// same addresses, served by the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_the_chat_listeners_over_too() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("chat-upgrade");
    let socket = dir.path().join("handover.sock");
    let base = with_handover(&sim, &socket);
    let cfg = dir.file(
        "config.toml",
        &format!(
            "{base}[[identity]]\nname = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n\
             [chat]\nwebsocket_addr = \"127.0.0.1:0\"\ntcp_addr = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            sim.chat_url()
        ),
    );
    let (mut old, mut old_log) = serve(&cfg, &["--threads", "1"], &[]);
    let chat = chat_listening(&mut old_log).await;
    wait_for_all(
        &mut old_log,
        &["session created", "takes over from this one"],
    )
    .await;

    let (mut new, mut new_log) = serve(&cfg, &["--threads", "1"], &[]);
    let took = wait_for(&mut new_log, "taking over the listening sockets").await;
    assert!(took.contains("chat=2"), "{took}");
    assert_eq!(chat_listening(&mut new_log).await, chat, "the same sockets");
    wait_for(&mut new_log, "ready: the process taken over from").await;
    wait_for(&mut old_log, "handed over").await;
    exits_cleanly(&mut old).await;

    // Only the new process is left to answer.
    let (ws, tcp) = chat;
    let _c = demo_chats(ws, "after the upgrade").await;
    let _t = crate::common::xmpp::XmppTcp::login(tcp, "1001-76730", "any", "tcp", None).await;
    assert_eq!(
        sim.chat_logins().len(),
        2,
        "the chat server saw both logins"
    );
    signal(&new, "TERM");
    exits_cleanly(&mut new).await;
}

/// The simulator's user 1001 logs in to chat over WebSocket at `addr`
/// (its session held by the config's identity `demo`), bound as `ws`.
async fn demo_chats(addr: std::net::SocketAddr, when: &str) -> crate::common::xmpp::Xmpp {
    let (c, jid) = crate::common::xmpp::Xmpp::login(
        &format!("ws://{addr}"),
        "chat.example",
        "1001-76730",
        "any",
        "ws",
    )
    .await
    .unwrap_or_else(|e| panic!("a chat login {when}: {e}"));
    assert!(jid.starts_with("1001-76730@"), "{jid}");
    c
}

/// Reads log lines until both chat listeners said where they listen:
/// (WebSocket, TCP).
async fn chat_listening(lines: &mut LogLines) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let (mut ws, mut tcp) = (None, None);
    while ws.is_none() || tcp.is_none() {
        let line = wait_for(lines, "chat listening").await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .map(|a| a.trim_matches('"').parse().expect("an address"));
        if line.contains("WebSocket") {
            ws = addr;
        } else {
            tcp = addr;
        }
    }
    (ws.unwrap(), tcp.unwrap())
}

/// A handover that does not complete changes nothing: a peer that sends
/// something else is refused, and one that takes the sockets but goes away
/// before `READY` leaves the old process serving (and offering) as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_not_completed_leaves_the_old_process_serving() {
    use std::io::{Read, Write};
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("half-handover");
    let socket = dir.path().join("handover.sock");
    let base = with_handover(&sim, &socket);
    let cfg = dir.file("config.toml", &base);
    let (mut child, mut lines) = serve(&cfg, &["--threads", "1"], &[]);
    let (proxy, _) = listening(&mut lines).await;
    wait_for_all(&mut lines, &["session created", "takes over from this one"]).await;

    let mut wrong = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    wrong.write_all(b"HELLO\n").unwrap();
    let mut answer = String::new();
    wrong.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"refused\""), "{answer}");
    wait_for(&mut lines, "handover not done").await;

    // Takes the sockets (the descriptors are dropped with the message) and
    // leaves without READY.
    let mut quitter = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    quitter.write_all(b"QBPROXY-HANDOVER 1\n").unwrap();
    let mut header = [0u8; 256];
    let n = quitter.read(&mut header).unwrap();
    let header: serde_json::Value = serde_json::from_slice(header[..n].trim_ascii_end()).unwrap();
    assert_eq!(header["pid"], child.id().unwrap(), "{header}");
    assert_eq!(header["proxy"], 1, "{header}");
    assert_eq!(header["admin"], true, "{header}");
    drop(quitter);
    let gone = wait_for(&mut lines, "handover not done").await;
    assert!(gone.contains("went away before it was ready"), "{gone}");

    let answer = common::raw(
        proxy,
        b"GET /users.json HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(socket.exists(), "still offered");
    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
}

/// `on_port_0`'s config with `listen.handover_socket` at `socket`.
fn with_handover(sim: &Sim, socket: &Path) -> String {
    on_port_0(sim).replacen(
        "[listen]\n",
        &format!(
            "[listen]\nhandover_socket = {:?}\n",
            socket.display().to_string()
        ),
        1,
    )
}

/// Two free loopback ports, for a program that cannot bind port 0 and
/// say which it got (`systemd-socket-activate`).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Starts qbproxy under `systemd-socket-activate` holding a loopback
/// socket on each of `ports`, named by `fdnames` (`proxy:admin:...`), with
/// `--threads threads`; once every socket is bound (it says "Listening on
/// ADDR as N." for each), its log lines. `None` when a port was taken
/// meanwhile (it exits when a bind fails): try others.
async fn socket_activated(
    ports: &[u16],
    fdnames: &str,
    threads: &str,
    cfg: &Path,
) -> Option<(tokio::process::Child, LogLines)> {
    let mut command = tokio::process::Command::new("systemd-socket-activate");
    for port in ports {
        command.args(["-l", &format!("127.0.0.1:{port}")]);
    }
    let mut child = command
        .args([&format!("--fdname={fdnames}"), "-E", "RUST_LOG=info", BIN])
        .args(["--threads", threads, "--config"])
        .arg(cfg)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd; .ci/run installs it)");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let last = format!(":{} as {}.", ports[ports.len() - 1], 2 + ports.len());
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(&last) {
                return true;
            }
        }
        false
    })
    .await
    .expect("systemd-socket-activate said nothing for 20 s");
    if all {
        return Some((child, lines));
    }
    let _ = child.wait().await;
    None
}

/// systemd socket activation, with systemd's own `systemd-socket-activate`:
/// it holds the sockets, starts qbproxy on the first connection and passes
/// them as LISTEN_FDS named proxy and admin. That first request, sent
/// before qbproxy ran, waits in the kernel's queue and is answered; the
/// admin listener is the one passed, not admin.addr; both workers serve
/// the one proxy socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_sockets_systemd_passes() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("activation");
    let cfg = dir.file("config.toml", &on_port_0(&sim));
    // A port taken between free_ports and the bind: try others.
    let (mut child, mut lines, proxy, admin) = 'bound: {
        for _ in 0..5 {
            let (p, a) = free_ports();
            if let Some((child, lines)) = socket_activated(&[p, a], "proxy:admin", "2", &cfg).await
            {
                break 'bound (
                    child,
                    lines,
                    format!("127.0.0.1:{p}").parse().unwrap(),
                    format!("127.0.0.1:{a}"),
                );
            }
        }
        panic!("no two free ports in five tries");
    };
    let proxy: std::net::SocketAddr = proxy;
    // qbproxy does not run yet: systemd-socket-activate waits for this.
    let answer = common::raw(
        proxy,
        b"GET /users.json HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let passed = wait_for(&mut lines, "socket activation").await;
    assert!(
        passed.contains("proxy=1") && passed.contains("admin=true"),
        "{passed}"
    );
    let ready = common::raw(
        admin.parse().unwrap(),
        format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let mut workers = Vec::new();
    while workers.len() < 2 {
        let line = wait_for(&mut lines, "listening").await;
        if listening_on(&line, "proxy") == Some(proxy) {
            workers.push(line);
        }
    }
    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
}

/// `[chat]`'s listener under socket activation: systemd holds it beside the
/// proxy's and the admin's (named `chat-websocket`), a chat client that
/// connects before qbproxy runs waits in the kernel's queue, and logs in
/// once qbproxy serves on that socket (binding its address again would
/// fail: systemd holds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_passes_the_chat_listener_too() {
    let sim = Sim::start(SimConfig::demo()).await.unwrap();
    let dir = TempDir::new("activation-chat");
    let (mut child, mut lines, chat) = 'bound: {
        for _ in 0..5 {
            let (p, a) = free_ports();
            let (c, _) = free_ports();
            let cfg = dir.file(
                "config.toml",
                &format!(
                    "{}[[identity]]\nname = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n\
                     [chat]\nwebsocket_addr = \"127.0.0.1:{c}\"\nupstream = \"{}\"\n",
                    on_port_0(&sim),
                    sim.chat_url()
                ),
            );
            let names = "proxy:admin:chat-websocket";
            if let Some((child, lines)) = socket_activated(&[p, a, c], names, "1", &cfg).await {
                let chat: std::net::SocketAddr = format!("127.0.0.1:{c}").parse().unwrap();
                break 'bound (child, lines, chat);
            }
        }
        panic!("no three free ports in five tries");
    };
    // qbproxy does not run yet: the chat client's connection starts it.
    let _c = demo_chats(chat, "on the socket systemd passed").await;
    let passed = wait_for(&mut lines, "socket activation").await;
    assert!(
        passed.contains("proxy=1") && passed.contains("chat=1"),
        "{passed}"
    );
    assert_eq!(sim.chat_logins().len(), 1);
    signal(&child, "TERM");
    exits_cleanly(&mut child).await;
}

/// Every `/_sim/*` control the simulator answers is listed by
/// `qbproxy sim --help` and in the README's "The simulator".
#[test]
fn sim_help_and_the_readme_list_every_simulator_control() {
    let source = include_str!("../../sim/src/lib.rs");
    let mut controls: Vec<&str> = source
        .match_indices("\"/_sim/")
        .map(|(at, _)| {
            let rest = &source[at + 1..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    controls.dedup();
    assert!(controls.len() >= 2, "{controls:?}");
    let help = std::process::Command::new(BIN)
        .args(["sim", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("### The simulator").unwrap()..];
    let section = &section[..section.find("\n## ").unwrap()];
    for control in controls {
        assert!(help.contains(control), "{control} in sim --help:\n{help}");
        assert!(section.contains(control), "{control} in the README");
    }
    // Both kinds of upload URL, and the path that takes uploads.
    for said in ["--s3-uploads", "/blobs/{id}/upload/"] {
        assert!(help.contains(said), "{said} in sim --help:\n{help}");
        assert!(section.contains(said), "{said} in the README");
    }
}

/// The Dockerfile builds the whole workspace (every member's manifest and
/// sources are copied in; every file it copies exists), and the
/// `.dockerignore` keeps `target/` (gigabytes) out of the build context.
#[test]
fn the_dockerfile_copies_the_whole_workspace_and_the_context_leaves_target_out() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let manifest: toml::Value = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    assert!(members.len() >= 2, "{members:?}");
    for member in members {
        let member = member.as_str().unwrap();
        let (toml, src) = match member {
            "." => (
                "COPY Cargo.toml Cargo.lock ./".to_owned(),
                "COPY src ./src".to_owned(),
            ),
            m => (
                format!("COPY {m}/Cargo.toml ./{m}/"),
                format!("COPY {m}/src ./{m}/src"),
            ),
        };
        assert!(docker.contains(&toml), "{toml} in the Dockerfile");
        assert!(docker.contains(&src), "{src} in the Dockerfile");
    }
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(root.join(source).exists(), "{source} ({line})");
        }
    }
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");
}

/// The systemd install lines leave a config the service's unprivileged
/// user can read: the mode they give `config.toml`, on a root-owned file,
/// read by `nobody` (as the unit's `DynamicUser` is), with the secret as a
/// credential file the user owns (as systemd hands it over). The mode they
/// used to give, 0640, shuts that user out, with a message saying why.
/// Needs root to make files root's and run as `nobody` (CI runs as root).
#[test]
fn the_systemd_install_lines_give_a_config_the_service_user_can_read() {
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        rustix::process::getuid().as_raw(),
        0,
        "this test makes root-owned files and runs qbproxy as nobody"
    );
    let unit = include_str!("../../deploy/qbproxy.service");
    let line = unit
        .lines()
        .find(|l| l.contains("config.toml /etc/qbproxy/config.toml"))
        .expect("an install line for the config");
    let mode = line
        .split_whitespace()
        .skip_while(|w| *w != "-m")
        .nth(1)
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or_else(|| panic!("a mode in {line}"));

    let dir = TempDir::new("systemd-modes");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The credential systemd hands the service: owned by its user, 0400.
    let secret = dir.file("auth_secret", "s3cr3t\n");
    rustix::fs::chown(&secret, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    let text = GOOD
        .replace(
            "auth_secret_env = \"QBPROXY_CLI_TEST_SECRET\"",
            &format!("auth_secret_file = {:?}", secret.display().to_string()),
        )
        .replace(
            "password_env = \"QBPROXY_CLI_TEST_PASSWORD\"",
            "password = \"pw\"",
        );
    let config = dir.file("config.toml", &text);
    let as_nobody = || {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "check",
                "--config",
            ])
            .arg(&config)
            .output()
            .expect("setpriv (util-linux)")
    };

    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
    let out = as_nobody();
    assert_eq!(
        out.status.code(),
        Some(0),
        "mode {mode:o}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = as_nobody();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("Permission denied")
            && stderr.contains("qbproxy runs as uid 65534")
            && stderr.contains("mode 0644"),
        "{stderr}"
    );
}

/// The README's SDK section names the three traps a new user met: the
/// `reconnect-core` override `npm install quickblox` needs, the silent
/// `err=null` of an untrusted certificate (and its cure), and the harmless
/// `accountKey` warning; and the override it names is the example's.
#[test]
fn the_readme_sdk_section_names_the_traps_a_new_user_meets() {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Using an official SDK").unwrap();
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").unwrap() + 3];
    for trap in [
        "\"overrides\": { \"reconnect-core\": \"$reconnect-core\" }",
        "\"reconnect-core\": \"file:vendor/reconnect-core\"",
        "`err=null`",
        "NODE_EXTRA_CA_CERTS",
        "`Parameter \"accountKey\" is missing`",
        "harmless",
    ] {
        assert!(section.contains(trap), "{trap} in the SDK section");
    }
    let package: serde_json::Value =
        serde_json::from_str(include_str!("../../examples/js-sdk/package.json")).unwrap();
    assert_eq!(
        package["overrides"]["reconnect-core"], "$reconnect-core",
        "{package}"
    );
    assert_eq!(
        package["dependencies"]["reconnect-core"], "file:vendor/reconnect-core",
        "{package}"
    );
    // The vendored copy is what node-xmpp-core asks for: dodo's fork, whose
    // reconnect hands the connection itself out as the emitter.
    let vendored = include_str!("../../examples/js-sdk/vendor/reconnect-core/index.js");
    assert!(
        vendored.contains("opts.emitter"),
        "the fork's emitter injection"
    );
}

/// ARCHITECTURE.md's code map names every source file of the tree (the
/// library, the binary, the simulator), and every file path the README or
/// ARCHITECTURE.md names exists.
#[test]
fn the_docs_name_every_source_file_and_only_files_that_exist() {
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    sources(&root.join("sim/src"), &mut files);
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            architecture.contains(&format!("`{name}`")),
            "{} is not in ARCHITECTURE.md's code map",
            file.display()
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for (doc, text) in [("README.md", &readme), ("ARCHITECTURE.md", &architecture)] {
        for quoted in text.split('`').skip(1).step_by(2) {
            let named = [
                "src/",
                "sim/",
                "tests/",
                "bench/",
                "deploy/",
                "examples/",
                "fuzz/",
            ]
            .iter()
            .any(|dir| quoted.starts_with(dir));
            let path = quoted.trim_end_matches(['/', ':']);
            if named && !path.contains(['*', '{', ' ', '<']) && !path.contains("::") {
                assert!(
                    root.join(path).exists(),
                    "{doc} names {quoted}, which does not exist"
                );
            }
        }
    }
}
