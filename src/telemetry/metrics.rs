//! Prometheus metrics. One registry per [`crate::App`], rendered as text by
//! the admin listener.
//!
//! Per-identity series are resolved once, into an [`IdentityMetrics`] that
//! the identity carries, so counting a request takes no lock: the common
//! status codes have a slot each (a `OnceLock`, filled on first use); rare
//! ones go through the labelled vector. Label values are identity and pool
//! names, never a token or a secret.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::session::Reason;
use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// A cheap-to-clone handle on the registry and its metric families.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    replays: IntCounterVec,
    renewals: IntCounterVec,
    failures: IntCounterVec,
    session_up: IntGaugeVec,
    set_aside: IntGaugeVec,
    pool_set_aside: IntGaugeVec,
    client_requests: IntCounterVec,
    upstream_latency: Histogram,
    upstream_slot_waits: IntCounter,
    buffer_full: IntCounter,
    adoptions: IntCounterVec,
    cluster_up: IntGauge,
    cluster_replicas: IntGauge,
    cluster_subscribed: IntGauge,
    cluster_reconnects: IntCounter,
    upstream_rate_limited: IntCounter,
    upstream_429: IntCounter,
    client_tokens_replaced: IntCounterVec,
    worker_requests: IntCounterVec,
    upstream: UpstreamMetrics,
    chat: ChatMetrics,
    /// Brought up to `logging::dropped_lines()` at each render, under the
    /// lock so two renders do not both add the difference.
    log_lines_dropped: std::sync::Mutex<IntCounter>,
    /// Every family's name, series or not (the text exposition leaves out
    /// a labelled family until its first series).
    names: Vec<String>,
    /// Bumped by the rare events a test may wait for (a request waiting for
    /// an upstream slot, a body past the buffer budget), so it need not poll.
    events: Events,
    /// Requests answered before an identity was chosen (bad identity name).
    unrouted: OnceLock<Arc<IdentityMetrics>>,
}

/// Status codes that get a lock-free slot.
const COMMON: [u16; 22] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 422, 429, 431, 500,
    502, 503, 504,
];

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let who = ["identity", "pool"];
        let requests = counter_vec(
            "qbproxy_requests_total",
            "Responses sent to clients, by identity, pool and HTTP status.",
            &["identity", "pool", "code"],
        );
        let replays = counter_vec(
            "qbproxy_replays_total",
            "Requests replayed with a new token after QuickBlox refused an expired session.",
            &who,
        );
        let renewals = counter_vec(
            "qbproxy_session_renewals_total",
            "Sessions created, by identity, pool and reason (startup, expired, proactive, forced).",
            &["identity", "pool", "reason"],
        );
        let failures = counter_vec(
            "qbproxy_session_failures_total",
            "Failed attempts to create a session.",
            &who,
        );
        let session_up = gauge_vec(
            "qbproxy_session_up",
            "1 while the identity holds a usable session.",
            &who,
        );
        let set_aside = gauge_vec(
            "qbproxy_session_set_aside",
            "1 while a pool member is set aside because QuickBlox refused its credentials.",
            &who,
        );
        let pool_set_aside = gauge_vec(
            "qbproxy_pool_members_set_aside",
            "Members of the pool set aside now (QuickBlox refused their credentials); the pool serves with the rest, and /readyz stays 200 while one serves.",
            &["pool"],
        );
        let client_requests = counter_vec(
            "qbproxy_client_requests_total",
            "Responses sent to API-key clients, by client name and HTTP status.",
            &["client", "code"],
        );
        let upstream_latency = Histogram::with_opts(
            HistogramOpts::new(
                "qbproxy_upstream_duration_seconds",
                "Time from sending a request upstream to its response headers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let upstream_slot_waits = IntCounter::new(
            "qbproxy_upstream_slot_waits_total",
            "Requests that waited for a free upstream slot (upstream.max_in_flight).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));

        let buffer_full = IntCounter::new(
            "qbproxy_buffer_full_total",
            "Request bodies that streamed without a replay buffer because limits.max_buffered_bytes was in use.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));

        let adoptions = counter_vec(
            "qbproxy_session_adoptions_total",
            "Sessions another replica created that this one adopted ([cluster]).",
            &who,
        );
        let cluster_up = IntGauge::new(
            "qbproxy_cluster_up",
            "1 while Redis answers ([cluster]); 0 while each replica falls back to its own sessions and its share of the rate.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let cluster_replicas = IntGauge::new(
            "qbproxy_cluster_replicas",
            "Replicas with a heartbeat in Redis in the last minute, this one included ([cluster]): upstream.rate is divided by it while Redis is down.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let cluster_subscribed = IntGauge::new(
            "qbproxy_cluster_subscribed",
            "1 while this replica hears of sessions other replicas store (Redis pub/sub, [cluster]); 0: it polls for them every 50 ms.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let cluster_reconnects = IntCounter::new(
            "qbproxy_cluster_reconnects_total",
            "Redis calls made again on a new connection after theirs dropped (Redis restarted, CLIENT KILL), before Redis counted as down ([cluster]).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let upstream_rate_limited = IntCounter::new(
            "qbproxy_upstream_rate_limited_total",
            "Requests refused (429 upstream-rate-limited) because upstream.rate had no room within upstream.rate_wait.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let upstream_429 = IntCounter::new(
            "qbproxy_upstream_429_total",
            "429 answers from QuickBlox itself (its plan's rate limit), forwarded requests and session creations.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let client_tokens_replaced = counter_vec(
            "qbproxy_client_tokens_replaced_total",
            "Requests whose client sent credentials of its own (QB-Token, Authorization, On-Behalf-Of), replaced with the identity's (proxy.client_token = \"replace\").",
            &who,
        );
        let worker_requests = counter_vec(
            "qbproxy_worker_requests_total",
            "Requests by the proxy worker that accepted their connection (--threads; the kernel spreads connections over workers by SO_REUSEPORT).",
            &["worker"],
        );
        let events = Events::default();
        let upstream = UpstreamMetrics::new(events.clone());
        let chat = ChatMetrics::new(events.clone());
        let log_lines_dropped = IntCounter::new(
            "qbproxy_log_lines_dropped_total",
            "Log lines (access events included) dropped because the log writer fell behind stderr.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));

        let registry = Registry::new();
        let mut names = Vec::new();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(replays.clone()),
            Box::new(renewals.clone()),
            Box::new(failures.clone()),
            Box::new(session_up.clone()),
            Box::new(set_aside.clone()),
            Box::new(pool_set_aside.clone()),
            Box::new(client_requests.clone()),
            Box::new(upstream_latency.clone()),
            Box::new(upstream_slot_waits.clone()),
            Box::new(buffer_full.clone()),
            Box::new(adoptions.clone()),
            Box::new(cluster_up.clone()),
            Box::new(cluster_replicas.clone()),
            Box::new(cluster_subscribed.clone()),
            Box::new(cluster_reconnects.clone()),
            Box::new(upstream_rate_limited.clone()),
            Box::new(upstream_429.clone()),
            Box::new(client_tokens_replaced.clone()),
            Box::new(worker_requests.clone()),
            Box::new(log_lines_dropped.clone()),
        ]
        .into_iter()
        .chain(upstream.collectors())
        .chain(chat.collectors())
        {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                replays,
                renewals,
                failures,
                session_up,
                set_aside,
                pool_set_aside,
                client_requests,
                upstream_latency,
                upstream_slot_waits,
                buffer_full,
                adoptions,
                cluster_up,
                cluster_replicas,
                cluster_subscribed,
                cluster_reconnects,
                upstream_rate_limited,
                upstream_429,
                client_tokens_replaced,
                worker_requests,
                upstream,
                chat,
                log_lines_dropped: std::sync::Mutex::new(log_lines_dropped),
                names,
                events,
                unrouted: OnceLock::new(),
            }),
        }
    }

    /// The series of one identity. Standalone identities get every series
    /// at zero at once, so dashboards see them before the first event; pool
    /// members (there may be thousands) only once something happens.
    pub fn identity(&self, identity: &str, pool: Option<&str>) -> IdentityMetrics {
        let i = &self.inner;
        let pool = pool.unwrap_or("");
        let labels = [identity, pool];
        let m = IdentityMetrics {
            labels: [identity.to_owned(), pool.to_owned()],
            client_tokens_replaced: i.client_tokens_replaced.clone(),
            requests: CodeCounter::new(&i.requests, &[identity, pool]),
            replays_vec: i.replays.clone(),
            adoptions: i.adoptions.clone(),
            replays: OnceLock::new(),
            renewals: i.renewals.clone(),
            failures: i.failures.clone(),
            session_up: i.session_up.clone(),
            set_aside: i.set_aside.clone(),
            pool_set_aside: i.pool_set_aside.clone(),
        };
        if identity.is_empty() && !pool.is_empty() {
            // The pool's own series: its count of set-aside members, 0 at first.
            i.pool_set_aside.with_label_values(&[pool]);
        }
        if pool.is_empty() && !identity.is_empty() {
            for reason in Reason::ALL {
                i.renewals
                    .with_label_values(&[identity, pool, reason.as_str()]);
            }
            i.failures.with_label_values(&labels);
            i.session_up.with_label_values(&labels).set(0);
            m.replays();
        }
        m
    }

    /// The name of every metric family qbproxy exports.
    pub fn names(&self) -> &[String] {
        &self.inner.names
    }

    /// A client's `qbproxy_client_requests_total` series.
    pub fn client(&self, name: &str) -> CodeCounter {
        CodeCounter::new(&self.inner.client_requests, &[name])
    }

    /// Series for requests answered before an identity was chosen.
    pub fn unrouted(&self) -> &IdentityMetrics {
        self.inner
            .unrouted
            .get_or_init(|| Arc::new(self.identity("", None)))
    }

    /// One request counter per proxy worker, all at zero from the start.
    pub fn worker_requests(&self, workers: usize) -> Vec<IntCounter> {
        (0..workers)
            .map(|n| {
                self.inner
                    .worker_requests
                    .with_label_values(&[&n.to_string()])
            })
            .collect()
    }

    /// The upstream connections' series, shared by every worker's pool.
    pub fn upstream(&self) -> &UpstreamMetrics {
        &self.inner.upstream
    }

    pub fn chat(&self) -> &ChatMetrics {
        &self.inner.chat
    }

    pub fn upstream_latency(&self, d: Duration) {
        self.inner.upstream_latency.observe(d.as_secs_f64());
    }

    pub fn upstream_slot_wait(&self) {
        self.inner.upstream_slot_waits.inc();
        self.event();
    }

    pub fn buffer_full(&self) {
        self.inner.buffer_full.inc();
        self.event();
    }

    pub fn cluster_up(&self, up: bool) {
        self.inner.cluster_up.set(i64::from(up));
        self.event();
    }

    pub fn cluster_replicas(&self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.inner.cluster_replicas.get() != n {
            self.inner.cluster_replicas.set(n);
            self.event();
        }
    }

    pub fn cluster_subscribed(&self, on: bool) {
        self.inner.cluster_subscribed.set(i64::from(on));
        self.event();
    }

    pub fn cluster_reconnect(&self) {
        self.inner.cluster_reconnects.inc();
        self.event();
    }

    pub fn upstream_rate_limited(&self) {
        self.inner.upstream_rate_limited.inc();
    }

    pub fn upstream_429(&self) {
        self.inner.upstream_429.inc();
    }

    /// Counts an event for [`Metrics::events`].
    fn event(&self) {
        self.inner.events.bump();
    }

    /// Changes with every slot wait, every unbuffered body, every change
    /// of the `qbproxy_cluster_*` gauges, of the upstream connections open
    /// and of the chat connections open.
    pub fn events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.events.0.subscribe()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        {
            let dropped = self
                .inner
                .log_lines_dropped
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = crate::telemetry::logging::dropped_lines();
            if now > dropped.get() {
                dropped.inc_by(now - dropped.get());
            }
        }
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The channel behind [`Metrics::events`], shared with the series that
/// bump it.
#[derive(Clone)]
struct Events(Arc<tokio::sync::watch::Sender<u64>>);

impl Default for Events {
    fn default() -> Self {
        Events(Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl Events {
    /// Without a receiver (no test waiting) it does nothing: a receiver
    /// sees the changes made after it subscribed, and waking no one would
    /// still visit every waiter list.
    fn bump(&self) {
        if self.0.receiver_count() > 0 {
            self.0.send_modify(|n| *n += 1);
        }
    }
}

/// What an upstream connection speaks, as its ALPN name says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    H1,
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H1 => "http/1.1",
            Protocol::H2 => "h2",
        }
    }
}

/// Chat's series (`chat/`).
#[derive(Clone)]
pub struct ChatMetrics {
    connections: IntGaugeVec,
    logins: IntCounterVec,
    stanzas: IntCounterVec,
    events: Events,
}

impl ChatMetrics {
    fn new(events: Events) -> ChatMetrics {
        ChatMetrics {
            events,
            connections: gauge_vec(
                "qbproxy_chat_connections",
                "Chat connections open, by transport (websocket, tcp).",
                &["transport"],
            ),
            logins: counter_vec(
                "qbproxy_chat_logins_total",
                "Chat logins, by identity, pool and outcome (ok; renewed: ok after one renewal; passed: a user qbproxy does not hold, with the client's own credentials; refused: by qbproxy or the chat server; failed: the chat server unreachable or misbehaving).",
                &["identity", "pool", "outcome"],
            ),
            stanzas: counter_vec(
                "qbproxy_chat_stanzas_total",
                "XMPP elements relayed after login, by direction (in: from clients, out: to clients).",
                &["direction"],
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.connections.clone()),
            Box::new(self.logins.clone()),
            Box::new(self.stanzas.clone()),
        ]
    }

    /// A connection on `transport`, counted open until the guard drops.
    pub fn open(&self, transport: &str) -> ChatConnection {
        let gauge = self.connections.with_label_values(&[transport]);
        gauge.inc();
        self.events.bump();
        ChatConnection(gauge, self.events.clone())
    }

    pub fn login(&self, identity: &str, pool: &str, outcome: &str) {
        self.logins
            .with_label_values(&[identity, pool, outcome])
            .inc();
    }

    /// The counters for elements from clients and to clients.
    pub fn stanzas(&self) -> (IntCounter, IntCounter) {
        (
            self.stanzas.with_label_values(&["in"]),
            self.stanzas.with_label_values(&["out"]),
        )
    }
}

/// An open chat connection, counted in `qbproxy_chat_connections`.
pub struct ChatConnection(IntGauge, Events);

impl Drop for ChatConnection {
    fn drop(&mut self) {
        self.0.dec();
        self.1.bump();
    }
}

/// The upstream connections' series (`upstream/pool.rs`,
/// `upstream/connect.rs`), resolved once: counting takes no lock.
#[derive(Clone)]
pub struct UpstreamMetrics {
    open: [IntGauge; 2],
    opened: [IntCounter; 2],
    /// Requests out on upstream connections right now.
    pub in_flight: IntGauge,
    /// GOAWAY frames received.
    pub goaways: IntCounter,
    /// Requests sent again on another connection because the upstream
    /// had not processed them.
    pub resent: IntCounter,
    pub connect_errors: IntCounter,
    connection_waits: IntCounter,
    abandoned: IntCounter,
    handshakes: [IntCounter; 2],
    events: Events,
    /// The labelled families, for the registry.
    vecs: (IntGaugeVec, IntCounterVec, IntCounterVec),
}

impl UpstreamMetrics {
    fn new(events: Events) -> UpstreamMetrics {
        let open = gauge_vec(
            "qbproxy_upstream_connections",
            "Connections open to the upstream, by protocol (h2, http/1.1).",
            &["protocol"],
        );
        let opened = counter_vec(
            "qbproxy_upstream_connections_opened_total",
            "Connections opened to the upstream, by protocol.",
            &["protocol"],
        );
        let handshakes = counter_vec(
            "qbproxy_upstream_tls_handshakes_total",
            "TLS handshakes with the upstream: full, or resumed from an earlier session (a round trip and the key exchange saved).",
            &["kind"],
        );
        let in_flight = IntGauge::new(
            "qbproxy_upstream_in_flight",
            "Requests out on upstream connections (HTTP/2 streams and HTTP/1.1 requests), from sending until their response body ends.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let goaways = IntCounter::new(
            "qbproxy_upstream_goaways_total",
            "GOAWAY frames the upstream sent (nginx after keepalive_requests, at its idle timeout, on reload): the connection takes no new requests.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let resent = IntCounter::new(
            "qbproxy_upstream_resent_total",
            "Requests sent again on another connection because the upstream had not processed them (refused by GOAWAY or REFUSED_STREAM, or never written to a connection that closed).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let connect_errors = IntCounter::new(
            "qbproxy_upstream_connect_errors_total",
            "Connections to the upstream that could not be made (TCP, TLS or the HTTP handshake failed or timed out).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let connection_waits = IntCounter::new(
            "qbproxy_upstream_connection_waits_total",
            "Requests that waited for a connection because every one a worker may open (upstream.max_connections) was busy.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let abandoned = IntCounter::new(
            "qbproxy_upstream_abandoned_total",
            "Requests whose client went away before the upstream answered: the answer is read to its end (within the request's deadline) rather than the stream reset.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let by_protocol = |v: &IntCounterVec| {
            [Protocol::H1, Protocol::H2].map(|p| v.with_label_values(&[p.as_str()]))
        };
        UpstreamMetrics {
            open: [Protocol::H1, Protocol::H2].map(|p| open.with_label_values(&[p.as_str()])),
            opened: by_protocol(&opened),
            handshakes: ["full", "resumed"].map(|k| handshakes.with_label_values(&[k])),
            in_flight: in_flight.clone(),
            goaways: goaways.clone(),
            resent: resent.clone(),
            connect_errors: connect_errors.clone(),
            connection_waits: connection_waits.clone(),
            abandoned: abandoned.clone(),
            events,
            vecs: (open, opened, handshakes),
        }
    }

    /// Every family, for the registry (clones share their series).
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.vecs.0.clone()),
            Box::new(self.vecs.1.clone()),
            Box::new(self.vecs.2.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.goaways.clone()),
            Box::new(self.resent.clone()),
            Box::new(self.connect_errors.clone()),
            Box::new(self.connection_waits.clone()),
            Box::new(self.abandoned.clone()),
        ]
    }

    pub fn opened(&self, p: Protocol) {
        self.opened[p as usize].inc();
        self.open[p as usize].inc();
        self.events.bump();
    }

    pub fn closed(&self, p: Protocol) {
        self.open[p as usize].dec();
        self.events.bump();
    }

    /// A request waits because every connection a worker may open is
    /// busy.
    pub fn connection_wait(&self) {
        self.connection_waits.inc();
        self.events.bump();
    }

    /// A request's client went away before the upstream answered.
    pub fn abandoned(&self) {
        self.abandoned.inc();
        self.events.bump();
    }

    pub fn handshake(&self, resumed: bool) {
        self.handshakes[usize::from(resumed)].inc();
    }
}

/// A counter family's children by HTTP status for fixed leading labels
/// (the status code is the last label). Common codes are resolved once into
/// lock-free slots; rare ones go through the vector.
pub struct CodeCounter {
    labels: Vec<String>,
    by_code: [OnceLock<IntCounter>; COMMON.len()],
    family: IntCounterVec,
}

impl CodeCounter {
    fn new(family: &IntCounterVec, labels: &[&str]) -> CodeCounter {
        CodeCounter {
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            by_code: std::array::from_fn(|_| OnceLock::new()),
            family: family.clone(),
        }
    }

    fn child(&self, status: StatusCode) -> IntCounter {
        let mut labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        labels.push(status.as_str());
        self.family.with_label_values(&labels)
    }

    /// Counts a response.
    pub fn inc(&self, status: StatusCode) {
        match COMMON.iter().position(|c| *c == status.as_u16()) {
            Some(slot) => self.by_code[slot].get_or_init(|| self.child(status)).inc(),
            None => self.child(status).inc(),
        }
    }
}

/// One identity's series, resolved once.
pub struct IdentityMetrics {
    labels: [String; 2],
    client_tokens_replaced: IntCounterVec,
    adoptions: IntCounterVec,
    requests: CodeCounter,
    replays_vec: IntCounterVec,
    replays: OnceLock<IntCounter>,
    renewals: IntCounterVec,
    failures: IntCounterVec,
    session_up: IntGaugeVec,
    set_aside: IntGaugeVec,
    pool_set_aside: IntGaugeVec,
}

impl IdentityMetrics {
    fn child<'a>(&'a self, extra: &'a str) -> [&'a str; 3] {
        [&self.labels[0], &self.labels[1], extra]
    }

    fn who(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }

    /// Counts a response sent to a client.
    pub fn request(&self, status: StatusCode) {
        self.requests.inc(status);
    }

    fn replays(&self) -> &IntCounter {
        self.replays
            .get_or_init(|| self.replays_vec.with_label_values(&self.who()))
    }

    pub fn replay(&self) {
        self.replays().inc();
    }

    pub fn renewal(&self, reason: Reason) {
        self.renewals
            .with_label_values(&self.child(reason.as_str()))
            .inc();
    }

    /// A client's own `QB-Token` replaced with this identity's.
    pub fn client_token_replaced(&self) {
        self.client_tokens_replaced
            .with_label_values(&self.who())
            .inc();
    }

    pub fn adoption(&self) {
        self.adoptions.with_label_values(&self.who()).inc();
    }

    pub fn session_failure(&self) {
        self.failures.with_label_values(&self.who()).inc();
    }

    pub fn session_up(&self, up: bool) {
        let g: IntGauge = self.session_up.with_label_values(&self.who());
        g.set(i64::from(up));
    }

    /// A member set aside or back (called on each change only).
    pub fn set_aside(&self, aside: bool) {
        self.set_aside
            .with_label_values(&self.who())
            .set(i64::from(aside));
        if !self.labels[1].is_empty() {
            self.pool_set_aside
                .with_label_values(&[&self.labels[1]])
                .add(if aside { 1 } else { -1 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_identity_labels() {
        let m = Metrics::new();
        let bot = m.identity("bot", None);
        bot.request(StatusCode::OK);
        bot.request(StatusCode::OK);
        bot.request(StatusCode::from_u16(418).unwrap());
        bot.renewal(Reason::Startup);
        bot.session_failure();
        bot.replay();
        let member = m.identity("load-1", Some("load"));
        member.request(StatusCode::SERVICE_UNAVAILABLE);
        member.set_aside(true);
        m.unrouted().request(StatusCode::BAD_REQUEST);
        m.upstream_latency(Duration::from_millis(3));
        let text = m.render();
        for line in [
            "qbproxy_requests_total{code=\"200\",identity=\"bot\",pool=\"\"} 2",
            "qbproxy_requests_total{code=\"418\",identity=\"bot\",pool=\"\"} 1",
            "qbproxy_requests_total{code=\"503\",identity=\"load-1\",pool=\"load\"} 1",
            "qbproxy_requests_total{code=\"400\",identity=\"\",pool=\"\"} 1",
            "qbproxy_session_renewals_total{identity=\"bot\",pool=\"\",reason=\"startup\"} 1",
            "qbproxy_session_renewals_total{identity=\"bot\",pool=\"\",reason=\"proactive\"} 0",
            "qbproxy_session_failures_total{identity=\"bot\",pool=\"\"} 1",
            "qbproxy_replays_total{identity=\"bot\",pool=\"\"} 1",
            "qbproxy_session_set_aside{identity=\"load-1\",pool=\"load\"} 1",
            "qbproxy_upstream_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Pool members get no zero series up front.
        assert!(!text.contains("identity=\"load-1\",pool=\"load\",reason=\"startup\""));
    }
}
