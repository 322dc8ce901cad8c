//! Test harness: the simulator and a real qbproxy on `127.0.0.1:0`, both
//! in-process, plus small HTTP helpers. Nothing leaves loopback.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use qbproxy::{App, Config, Handle, Listeners};
use qbproxy_sim::{Sim, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod certs;
pub mod edge;
pub mod fleet;
pub mod prosody;
pub mod redis_server;
pub mod relay;
pub mod xmpp;

/// Every wait in a test is bounded by this, so a broken build fails
/// instead of hanging. It is not a measure of speed.
pub const BOUND: Duration = Duration::from_secs(20);

pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Configures a proxy in front of a simulator.
pub struct Setup {
    sim: Option<Sim>,
    upstream_url: Option<String>,
    /// section -> key -> TOML literal
    values: BTreeMap<String, BTreeMap<String, String>>,
    identities: Vec<String>,
    pools: Vec<String>,
    bind: String,
    extra: String,
}

pub fn setup() -> Setup {
    let mut s = Setup {
        sim: None,
        upstream_url: None,
        values: BTreeMap::new(),
        identities: Vec::new(),
        pools: Vec::new(),
        bind: "127.0.0.1:0".into(),
        extra: String::new(),
    };
    // Short retries keep failure tests quick; timeouts are generous, so a
    // test that "fails promptly" proves it did not wait for one.
    s = s
        .set("upstream", "timeout", Duration::from_secs(60))
        .set("quickblox", "retry_initial", Duration::from_millis(20))
        .set("quickblox", "retry_max", Duration::from_millis(100))
        .set("quickblox", "session_timeout", Duration::from_secs(30))
        .set("listen", "shutdown_grace", Duration::from_secs(10))
        // Tests that stop a proxy stop it at once unless they test the
        // delay.
        .set("listen", "shutdown_delay", Duration::from_secs(0));
    s
}

impl Setup {
    /// Sets `[section] key = literal` (a TOML literal: quote strings).
    pub fn set(mut self, section: &str, key: &str, value: impl ToToml) -> Self {
        self.values
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_toml());
        self
    }

    /// Uses this simulator instead of a fresh one.
    pub fn sim(mut self, sim: Sim) -> Self {
        self.sim = Some(sim);
        self
    }

    /// Points the proxy at this URL instead of the simulator.
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream_url = Some(url.to_owned());
        self
    }

    /// Adds an `[[identity]]` table (its body, TOML lines). Without any,
    /// the simulator's user "demo" is the identity.
    pub fn identity(mut self, body: &str) -> Self {
        self.identities.push(body.to_owned());
        self
    }

    /// Binds the proxy listener here instead of `127.0.0.1:0`.
    pub fn bind(mut self, addr: &str) -> Self {
        self.bind = addr.to_owned();
        self
    }

    /// Appends TOML as it is (e.g. `[[client]]` tables).
    pub fn raw_table(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Adds a `[[pool]]` table (its body, TOML lines).
    pub fn pool_table(mut self, body: &str) -> Self {
        self.pools.push(body.to_owned());
        self
    }

    pub fn config_text(&self, sim: &Sim) -> String {
        let app = sim.config();
        let mut values = self.values.clone();
        let q = values.entry("quickblox".into()).or_default();
        q.entry("application_id".into())
            .or_insert(format!("{:?}", app.application_id));
        q.entry("auth_key".into())
            .or_insert(format!("{:?}", app.auth_key));
        q.entry("auth_secret".into())
            .or_insert(format!("{:?}", app.auth_secret));
        let url = self.upstream_url.clone().unwrap_or_else(|| sim.url());
        values
            .entry("upstream".into())
            .or_default()
            .entry("url".into())
            .or_insert(format!("{url:?}"));
        // Placeholders: run() serves on the listeners the test binds.
        let l = values.entry("listen".into()).or_default();
        l.entry("addr".into()).or_insert("\"127.0.0.1:1\"".into());
        values
            .entry("admin".into())
            .or_default()
            .entry("addr".into())
            .or_insert("\"127.0.0.1:2\"".into());

        let mut text = String::new();
        for (section, kv) in &values {
            text.push_str(&format!("[{section}]\n"));
            for (k, v) in kv {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        let identities = if self.identities.is_empty() {
            let u = &app.users[0];
            vec![format!(
                "name = \"demo\"\nlogin = {:?}\npassword = {:?}\n",
                u.login, u.password
            )]
        } else {
            self.identities.clone()
        };
        for body in identities {
            text.push_str("[[identity]]\n");
            text.push_str(&body);
        }
        for body in &self.pools {
            text.push_str("[[pool]]\n");
            text.push_str(body);
        }
        text.push_str(&self.extra);
        text
    }

    /// Starts the simulator (unless given) and the proxy. Does not wait for
    /// the first session.
    pub async fn start(self) -> Harness {
        let (sim, config) = self.prepare().await;
        start_app_on(sim, config, &self.bind).await
    }

    /// Starts qbproxy with `workers` proxy workers (`--threads`).
    pub async fn start_workers(self, workers: usize) -> Harness {
        let (sim, config) = self.prepare().await;
        start_app_workers(sim, config, workers).await
    }

    /// The simulator (the given one or a new demo one) and the config.
    async fn prepare(&self) -> (Sim, Config) {
        let sim = match &self.sim {
            Some(s) => s.clone(),
            None => Sim::start(SimConfig::demo())
                .await
                .expect("start simulator"),
        };
        let text = self.config_text(&sim);
        let config = Config::from_toml(&text, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        (sim, config)
    }
}

/// A value for [`Setup::set`], written as TOML: text quoted, a `Duration`
/// as the config writes one (`"300ms"`), numbers and booleans as they are,
/// and arrays of these.
pub trait ToToml {
    fn to_toml(&self) -> String;
}

impl<T: ToToml + ?Sized> ToToml for &T {
    fn to_toml(&self) -> String {
        (**self).to_toml()
    }
}

impl ToToml for str {
    fn to_toml(&self) -> String {
        toml::Value::String(self.to_owned()).to_string()
    }
}

impl ToToml for String {
    fn to_toml(&self) -> String {
        self.as_str().to_toml()
    }
}

impl ToToml for Path {
    fn to_toml(&self) -> String {
        self.to_str().expect("a UTF-8 path").to_toml()
    }
}

impl ToToml for std::path::PathBuf {
    fn to_toml(&self) -> String {
        self.as_path().to_toml()
    }
}

impl ToToml for Duration {
    fn to_toml(&self) -> String {
        humantime::format_duration(*self).to_string().to_toml()
    }
}

macro_rules! plain_toml {
    ($($t:ty),*) => {$(
        impl ToToml for $t {
            fn to_toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
plain_toml!(bool, i32, u32, u64, usize, i64, f64);

impl<T: ToToml> ToToml for [T] {
    fn to_toml(&self) -> String {
        let items: Vec<String> = self.iter().map(ToToml::to_toml).collect();
        format!("[{}]", items.join(", "))
    }
}

impl<T: ToToml, const N: usize> ToToml for [T; N] {
    fn to_toml(&self) -> String {
        self.as_slice().to_toml()
    }
}

pub async fn start_app(sim: Sim, config: Config) -> Harness {
    start_app_on(sim, config, "127.0.0.1:0").await
}

pub async fn start_app_on(sim: Sim, config: Config, bind: &str) -> Harness {
    let proxy_l = TcpListener::bind(bind).await.unwrap();
    start_with(sim, App::new(config).expect("app"), proxy_l, Vec::new()).await
}

/// qbproxy with `workers` proxy workers, as `qbproxy --threads` runs it.
pub async fn start_app_workers(sim: Sim, config: Config, workers: usize) -> Harness {
    let (proxy_l, more) = qbproxy::process::bind("127.0.0.1:0".parse().unwrap(), workers).unwrap();
    let app = App::with_workers(config, workers).expect("app");
    start_with(sim, app, proxy_l, more).await
}

async fn start_with(
    sim: Sim,
    app: App,
    proxy_l: TcpListener,
    workers: Vec<std::net::TcpListener>,
) -> Harness {
    let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_l.local_addr().unwrap();
    let admin = admin_l.local_addr().unwrap();
    let handle = app.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(
        Listeners {
            proxy: proxy_l,
            admin: admin_l,
            workers,
            handover: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Harness {
        sim,
        proxy,
        admin,
        handle,
        stop: Some(stop),
        task: Some(task),
        client: client(),
    }
}

pub struct Harness {
    pub sim: Sim,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A response, body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first message of a QuickBlox-shaped error body.
    pub fn error_message(&self) -> String {
        self.json()["errors"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no errors[0] in {}", self.text()))
            .to_owned()
    }
}

/// A simulator with the demo application and users.
pub async fn demo_sim() -> Sim {
    Sim::start(SimConfig::demo())
        .await
        .expect("start simulator")
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

impl Harness {
    pub async fn ready(&self) {
        bounded("the first session", self.handle.ready()).await;
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        send(&self.client, self.proxy, method, path, headers, body.into()).await
    }

    /// Sends a request on a task of its own, for concurrent requests.
    pub fn spawn_send(
        &self,
        method: Method,
        path: impl Into<String>,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> JoinHandle<Answer> {
        let (client, proxy, path, body) =
            (self.client.clone(), self.proxy, path.into(), body.into());
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            send(&client, proxy, method, &path, &headers, body).await
        })
    }

    /// The default identity's current token.
    pub fn token(&self) -> String {
        let session = self.handle.default_identity().current().expect("a session");
        session.token().to_str().expect("ASCII token").to_owned()
    }

    /// A GET acting as `identity` (an identity or a pool).
    pub async fn get_as(&self, identity: &str, path: &str) -> Answer {
        self.send(
            Method::GET,
            path,
            &[("QBProxy-Identity", identity)],
            Bytes::new(),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Answer {
        send(
            &self.client,
            self.admin,
            Method::GET,
            path,
            &[],
            Bytes::new(),
        )
        .await
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            bounded("run() to return", task).await.unwrap();
        }
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn take_task(&mut self) -> JoinHandle<()> {
        self.task.take().expect("running")
    }

    pub fn metric(&self, line_prefix: &str) -> u64 {
        metric(&self.handle.metrics_text(), line_prefix)
    }

    /// Resolves once the metric line starting with `line_prefix` reaches
    /// `n`, for the counters `Handle::metric_events` signals (upstream slot
    /// waits, unbuffered bodies).
    pub async fn metric_reaches(&self, line_prefix: &str, n: u64) {
        let mut events = self.handle.metric_events();
        bounded(line_prefix, async {
            while self.metric(line_prefix) < n {
                let _ = events.changed().await;
            }
        })
        .await
    }
}

impl Harness {
    /// Resolves once the metric line starting with `line_prefix` is `n`,
    /// for the values `Handle::metric_events` signals (`qbproxy_cluster_up`).
    pub async fn metric_becomes(&self, line_prefix: &str, n: u64) {
        let mut events = self.handle.metric_events();
        bounded(line_prefix, async {
            while self.metric(line_prefix) != n {
                let _ = events.changed().await;
            }
        })
        .await
    }
}

/// A metric's value in Prometheus text: the sum of the series named as in
/// `selector` whose labels include every label it gives, in any order
/// (`name`, or `name{a="x",b="y"}`; the closing brace may be left out);
/// 0 if there is none. The text is parsed: a name is never matched as a
/// prefix of another, nor labels by their order.
pub fn metric(text: &str, selector: &str) -> u64 {
    let selector = selector.trim();
    let (name, wanted) = match selector.split_once('{') {
        Some((name, labels)) => (name, labels_of(labels.trim_end_matches('}'))),
        None => (selector, Vec::new()),
    };
    let mut sum = 0.0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line: series value");
        let (series_name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                labels_of(l.strip_suffix('}').expect("labels end with }")),
            ),
            None => (series, Vec::new()),
        };
        if series_name == name && wanted.iter().all(|w| labels.contains(w)) {
            sum += value.parse::<f64>().expect("a sample's value");
        }
    }
    sum as u64
}

#[test]
fn metrics_are_parsed_not_matched_by_prefix() {
    let text = "# HELP qbproxy_a_total x\n\
                qbproxy_a_total{pool=\"\",identity=\"demo\"} 3\n\
                qbproxy_a_total_extra 9\n\
                qbproxy_a_total{identity=\"o\\\"ther\",pool=\"\"} 4\n";
    assert_eq!(
        metric(text, "qbproxy_a_total{identity=\"demo\",pool=\"\"}"),
        3
    );
    assert_eq!(metric(text, "qbproxy_a_total{identity=\"demo\""), 3);
    assert_eq!(metric(text, "qbproxy_a_total{identity=\"o\\\"ther\"}"), 4);
    assert_eq!(metric(text, "qbproxy_a_total"), 7);
    assert_eq!(metric(text, "qbproxy_a"), 0);
}

/// `a="x",b="y"` as pairs (values unescaped: `\"`, `\\`, `\n`).
fn labels_of(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((name.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = bounded("a response", client.request(req))
        .await
        .expect("request");
    let (parts, body) = resp.into_parts();
    let body = bounded("a body", body.collect()).await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends raw bytes on a new connection and returns everything read until
/// the server closes it (send `Connection: close`).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    bounded("the raw response", s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `GET path` on a kept-alive HTTP/1.1 connection (plain or TLS) and
/// reads its whole answer (headers and a `Content-Length` body).
pub async fn keep_alive_get<S>(conn: &mut S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    loop {
        let n = bounded("a keep-alive response", conn.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
}

/// Everything logged by this test binary. One global subscriber: a
/// per-thread one would race with tracing's per-callsite interest cache when
/// another test reaches the same log line first. Tests running in parallel
/// share it, so assertions look for lines unique to their test.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// True if one line holds every fragment.
    pub fn has_line(&self, fragments: &[&str]) -> bool {
        self.text()
            .lines()
            .any(|l| fragments.iter().all(|f| l.contains(f)))
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Every value of header `name` in the last request the simulator
/// recorded: what the upstream received.
pub fn last_received(sim: &Sim, name: &str) -> Vec<String> {
    let last = sim
        .requests()
        .pop()
        .expect("the simulator received a request");
    last.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The binary's log buffer, installing the global subscriber on first use.
pub fn capture_logs() -> Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(logs.clone())
            .with_ansi(false)
            .init();
        logs
    })
    .clone()
}
