//! Prometheus metrics. One registry per [`crate::App`], rendered as text by
//! the admin listener.
//!
//! The per-request path touches only pre-resolved atomic counters: the
//! `code` children are created once per status code and cached in a
//! `OnceLock` array, so counting a request takes no lock after the first
//! request with that code. Label values never carry a token or a secret.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// A cheap-to-clone handle on the registry and its metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    /// `requests` children by status code, resolved on first use.
    requests_by_code: Box<[OnceLock<IntCounter>]>,
    renewals: IntCounterVec,
    failures: IntCounterVec,
    session_up: IntGaugeVec,
    replays: IntCounter,
    upstream_latency: Histogram,
}

const CODES: usize = 600;

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "qbproxy_requests_total",
                "Responses sent to clients, by HTTP status.",
            ),
            &["code"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let renewals = IntCounterVec::new(
            Opts::new(
                "qbproxy_session_renewals_total",
                "Sessions created, by identity and reason (startup, expired, proactive).",
            ),
            &["identity", "reason"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let failures = IntCounterVec::new(
            Opts::new(
                "qbproxy_session_failures_total",
                "Failed attempts to create a session, by identity.",
            ),
            &["identity"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let session_up = IntGaugeVec::new(
            Opts::new(
                "qbproxy_session_up",
                "1 while the identity holds a usable session.",
            ),
            &["identity"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let replays = IntCounter::new(
            "qbproxy_replays_total",
            "Requests replayed with a new token after the upstream refused an expired session.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
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

        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(renewals.clone()),
            Box::new(failures.clone()),
            Box::new(session_up.clone()),
            Box::new(replays.clone()),
            Box::new(upstream_latency.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                requests_by_code: (0..CODES).map(|_| OnceLock::new()).collect(),
                renewals,
                failures,
                session_up,
                replays,
                upstream_latency,
            }),
        }
    }

    /// Counts a response sent to a client.
    pub fn request(&self, status: StatusCode) {
        let code = usize::from(status.as_u16());
        if let Some(slot) = self.inner.requests_by_code.get(code) {
            slot.get_or_init(|| self.inner.requests.with_label_values(&[status.as_str()]))
                .inc();
        }
    }

    /// Creates an identity's series at zero, so that dashboards and `rate()`
    /// see them before the first event.
    pub fn register_identity(&self, identity: &str, reasons: &[&str]) {
        for reason in reasons {
            self.inner.renewals.with_label_values(&[identity, reason]);
        }
        self.inner.failures.with_label_values(&[identity]);
        self.session_up(identity, false);
    }

    pub fn renewal(&self, identity: &str, reason: &str) {
        self.inner
            .renewals
            .with_label_values(&[identity, reason])
            .inc();
    }

    pub fn session_failure(&self, identity: &str) {
        self.inner.failures.with_label_values(&[identity]).inc();
    }

    pub fn session_up(&self, identity: &str, up: bool) {
        let g: IntGauge = self.inner.session_up.with_label_values(&[identity]);
        g.set(i64::from(up));
    }

    pub fn replay(&self) {
        self.inner.replays.inc();
    }

    pub fn upstream_latency(&self, d: Duration) {
        self.inner.upstream_latency.observe(d.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_required_family() {
        let m = Metrics::new();
        m.request(StatusCode::OK);
        m.request(StatusCode::OK);
        m.request(StatusCode::SERVICE_UNAVAILABLE);
        m.renewal("bot", "startup");
        m.session_failure("bot");
        m.replay();
        m.upstream_latency(Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains("qbproxy_requests_total{code=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("qbproxy_requests_total{code=\"503\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("qbproxy_session_renewals_total{identity=\"bot\",reason=\"startup\"} 1")
        );
        assert!(text.contains("qbproxy_session_failures_total{identity=\"bot\"} 1"));
        assert!(text.contains("qbproxy_replays_total 1"));
        assert!(text.contains("qbproxy_upstream_duration_seconds_count 1"));
    }
}
