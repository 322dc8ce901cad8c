//! A fixed-rate load generator for bench/renewal.sh and bench/soak.sh.
//!
//! Open loop: each of `--connections` keep-alive HTTP/1.1 connections sends
//! on its own schedule, so together they send `--rate` requests a second
//! whatever the answers do. Latency is measured from when a request was
//! due, not from when it was sent, so a stall shows up in full (no
//! coordinated omission). Every `--post-every`-th request is a POST with a
//! small JSON body, the rest are GETs.
//!
//! With `--expire-url`, it POSTs there every `--expire-every` (the
//! simulator's `/_sim/expire`), and reports latency inside the `--window`
//! after each expiry beside the latency outside them.
//!
//! Prints one JSON object: counts, failures (with the first few explained),
//! and latency percentiles, steady and in expiry windows.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

#[derive(Parser)]
struct Args {
    /// The proxy, e.g. 127.0.0.1:19100. Repeat it for several (a fleet's
    /// replicas): connection c goes to target c mod n.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Requests per second, in all.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    #[arg(long, default_value_t = 200)]
    connections: u32,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Every n-th request is a POST (0: none).
    #[arg(long, default_value_t = 4)]
    post_every: u64,
    /// An extra request header, `Name: value` (repeatable), e.g. the
    /// `QB-Token` when there is no proxy in front of the upstream.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Each connection is a client of its own: `QBProxy-Client: vu-<n>`
    /// (a pool's `sticky` strategy keeps each on its member).
    #[arg(long)]
    client_per_connection: bool,
    /// POSTed to at every expiry, e.g. http://127.0.0.1:19081/_sim/expire.
    #[arg(long)]
    expire_url: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    expire_every: Duration,
    /// How long after an expiry a request counts as "in the window".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    window: Duration,
}

/// One request: when it was due (µs after the start), how long it took
/// from then (µs), how long from when it was sent (µs: no timer slack or
/// wait for the connection in it), and its status (0: no answer).
struct Sample {
    due_us: u64,
    latency_us: u64,
    service_us: u64,
    status: u16,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + args.duration;
    let interval = Duration::from_secs_f64(f64::from(args.connections) / args.rate);

    let headers: Vec<(http::HeaderName, http::HeaderValue)> = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h.split_once(':').expect("--header is `Name: value`");
            (
                name.trim().parse().expect("a header name"),
                value.trim().parse().expect("a header value"),
            )
        })
        .collect();
    let headers = std::sync::Arc::new(headers);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let headers = if args.client_per_connection {
            let mut own = (*headers).clone();
            own.push((
                http::HeaderName::from_static("qbproxy-client"),
                http::HeaderValue::from_str(&format!("vu-{c}")).expect("a header value"),
            ));
            std::sync::Arc::new(own)
        } else {
            headers.clone()
        };
        let offset = interval.mul_f64(f64::from(c) / f64::from(args.connections));
        let target = args.target[c as usize % args.target.len()];
        let (post_every, connections) = (args.post_every, args.connections);
        tasks.push(tokio::spawn(async move {
            connection(
                target,
                start,
                start + offset,
                end,
                interval,
                &headers,
                |k| {
                    post_every != 0 && (k * u64::from(connections) + u64::from(c)) % post_every == 0
                },
            )
            .await
        }));
    }
    let expiries = match &args.expire_url {
        Some(url) => Some(tokio::spawn(expire(
            url.clone(),
            start,
            end,
            args.expire_every,
        ))),
        None => None,
    };

    let mut samples = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for t in tasks {
        let (s, e) = t.await.expect("connection task");
        samples.extend(s);
        errors.extend(e);
    }
    let expiries = match expiries {
        Some(t) => t.await.expect("expiry task"),
        None => Vec::new(),
    };
    report(&args, &samples, &errors, &expiries);
}

/// Sends on one connection, the k-th request at `first + k * interval`,
/// until `end`. Reconnects after a connection error.
async fn connection(
    target: SocketAddr,
    start: Instant,
    first: Instant,
    end: Instant,
    interval: Duration,
    headers: &[(http::HeaderName, http::HeaderValue)],
    is_post: impl Fn(u64) -> bool,
) -> (Vec<Sample>, Vec<String>) {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let mut sender = None;
    for k in 0.. {
        let due = first + interval * u32::try_from(k).unwrap_or(u32::MAX);
        if due >= end {
            break;
        }
        sleep_until(due).await;
        let post = is_post(k);
        let (method, path, body) = if post {
            (
                Method::POST,
                "/data/Note.json",
                Bytes::from(format!(
                    r#"{{"note":"load","n":{k},"pad":"{}"}}"#,
                    "x".repeat(200)
                )),
            )
        } else {
            (Method::GET, "/users.json?per_page=10", Bytes::new())
        };
        let sent = Instant::now();
        let result = send(&mut sender, target, method, path, headers, body).await;
        let latency_us = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
        let service_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        let due_us = u64::try_from((due - start).as_micros()).unwrap_or(0);
        let status = match result {
            Ok((status, _)) if status == StatusCode::OK => status.as_u16(),
            Ok((status, body)) => {
                if errors.len() < 5 {
                    errors.push(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
                status.as_u16()
            }
            Err(e) => {
                if errors.len() < 5 {
                    errors.push(e);
                }
                sender = None;
                0
            }
        };
        samples.push(Sample {
            due_us,
            latency_us,
            service_us,
            status,
        });
    }
    (samples, errors)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn send(
    sender: &mut Option<Sender>,
    target: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(http::HeaderName, http::HeaderValue)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    // A kept-alive connection the server closed between requests (its last
    // response said `Connection: close`, or it timed out idle) is replaced
    // before sending, as a client's pool does: nothing was sent on it.
    if let Some(s) = sender.as_mut() {
        if s.ready().await.is_err() {
            *sender = None;
        }
    }
    if sender.is_none() {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let s = sender.as_mut().expect("connected above");
    s.ready().await.map_err(|e| format!("connection: {e}"))?;
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("static path");
    req.headers_mut().insert(
        http::header::HOST,
        target.to_string().parse().expect("host"),
    );
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    for (name, value) in headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = s
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// POSTs to `url` every `every` from `start` until `end`; returns when
/// (µs after `start`) each expiry was asked for.
async fn expire(url: String, start: Instant, end: Instant, every: Duration) -> Vec<u64> {
    let uri: http::Uri = url.parse().expect("--expire-url is a URL");
    let addr = uri
        .authority()
        .expect("--expire-url has a host")
        .to_string();
    let mut at = Vec::new();
    for i in 1.. {
        let due = start + every * i;
        if due >= end {
            break;
        }
        sleep_until(due).await;
        let stream = TcpStream::connect(&addr)
            .await
            .expect("simulator reachable");
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake with the simulator");
        tokio::spawn(conn);
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.path().parse().expect("path");
        req.headers_mut()
            .insert(http::header::HOST, addr.parse().expect("host"));
        let resp = s.send_request(req).await.expect("expiry accepted");
        assert!(resp.status().is_success(), "expiry: {}", resp.status());
        at.push(u64::try_from((due - start).as_micros()).unwrap_or(0));
    }
    at
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn summary(mut latencies: Vec<u64>) -> serde_json::Value {
    latencies.sort_unstable();
    serde_json::json!({
        "requests": latencies.len(),
        "p50_ms": percentile(&latencies, 0.50),
        "p99_ms": percentile(&latencies, 0.99),
        "p999_ms": percentile(&latencies, 0.999),
        "max_ms": percentile(&latencies, 1.0),
    })
}

fn report(args: &Args, samples: &[Sample], errors: &[String], expiries: &[u64]) {
    let window_us = u64::try_from(args.window.as_micros()).unwrap_or(u64::MAX);
    let in_window = |due: u64| {
        expiries
            .iter()
            .any(|&e| due >= e && due < e.saturating_add(window_us))
    };
    let (mut steady, mut windows) = (Vec::new(), Vec::new());
    for s in samples {
        if in_window(s.due_us) {
            windows.push(s.latency_us);
        } else {
            steady.push(s.latency_us);
        }
    }
    let failed = samples.iter().filter(|s| s.status != 200).count();
    let all: Vec<u64> = samples.iter().map(|s| s.latency_us).collect();
    let out = serde_json::json!({
        "rate": args.rate,
        "connections": args.connections,
        "duration_s": args.duration.as_secs_f64(),
        "sent": samples.len(),
        "achieved_rate": samples.len() as f64 / args.duration.as_secs_f64(),
        "failed": failed,
        "first_failures": &errors[..errors.len().min(5)],
        "expiries": expiries.len(),
        "window_s": args.window.as_secs_f64(),
        "all": summary(all),
        "steady": summary(steady),
        "in_expiry_windows": summary(windows),
        // From when each request was sent: for the latency a proxy adds.
        "from_send": summary(samples.iter().map(|s| s.service_us).collect()),
    });
    println!("{out}");
}
