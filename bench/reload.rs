//! Reloading a large pool: how long `Handle::reload` takes for a pool of
//! MEMBERS (default 100,000) generated members, and how requests fare
//! while it runs. qbproxy runs in-process in front of the simulator on a
//! one-thread runtime (as with `--threads 1`); a client sends GETs one
//! after another throughout and records each one's latency.
//!
//!   cargo run --release --example reload-bench [MEMBERS]
//!
//! Prints a Markdown table (bench/reload.sh writes it to RELOAD-RESULTS.md).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use qbproxy::{App, Config, Listeners};
use qbproxy_sim::{Sim, SimConfig};
use tokio::net::TcpListener;

fn config(sim: &Sim, members: usize, password: &str) -> Config {
    let app = sim.config();
    let text = format!(
        r#"
[listen]
addr = "127.0.0.1:1"
[admin]
addr = "127.0.0.1:2"
[upstream]
url = "{url}"
[quickblox]
application_id = "{id}"
auth_key = "{key}"
auth_secret = "{secret}"
[[identity]]
name = "demo"
login = "demo"
password = "demo-password"
[[pool]]
name = "load"
login = "loadtest-{{n}}"
count = {members}
password = "{password}"
"#,
        url = sim.url(),
        id = app.application_id,
        key = app.auth_key,
        secret = app.auth_secret,
    );
    Config::from_toml(&text, Path::new("bench.toml")).expect("bench config")
}

/// Latencies of the GETs sent while `running` is set.
#[derive(Default)]
struct During {
    latencies: Vec<Duration>,
}

fn main() {
    let members: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sim = Sim::start(SimConfig::demo()).await.unwrap();
        let parse = Instant::now();
        let first = config(&sim, members, "pw-{n}");
        let parse = parse.elapsed();
        let build = Instant::now();
        let app = App::new(first).unwrap();
        let build = build.elapsed();
        let handle = app.handle();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        tokio::spawn(app.run(Listeners { proxy, admin, workers: Vec::new(), handover: None }, std::future::pending()));
        handle.ready().await;

        // A client sending GETs back to back, recording those sent while a
        // reload runs.
        let running = Arc::new(AtomicBool::new(false));
        let during = Arc::new(Mutex::new(During::default()));
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        {
            let (running, during) = (running.clone(), during.clone());
            let uri: http::Uri = format!("http://{addr}/users.json").parse().unwrap();
            tokio::spawn(async move {
                loop {
                    let sent = Instant::now();
                    let resp = client.get(uri.clone()).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                    if running.load(Ordering::Relaxed) {
                        during.lock().unwrap().latencies.push(sent.elapsed());
                    }
                }
            });
        }

        println!(
            "| reload of a pool of {members} members | reload | GETs answered during it | slowest GET during it |"
        );
        println!("|---|---|---|---|");
        println!(
            "| (start: parsing the config {:.0} ms, building {:.0} ms) | | | |",
            parse.as_secs_f64() * 1000.0,
            build.as_secs_f64() * 1000.0
        );
        let cases: [(&str, usize, &str); 5] = [
            ("nothing changed", members, "pw-{n}"),
            ("every member's password rotated", members, "pw2-{n}"),
            ("one member removed", members - 1, "pw2-{n}"),
            ("one member added back", members, "pw2-{n}"),
            ("half the members removed", members / 2, "pw2-{n}"),
        ];
        for (what, count, password) in cases {
            let next = config(&sim, count, password);
            during.lock().unwrap().latencies.clear();
            // Let a few requests go first, so one is in flight throughout.
            tokio::time::sleep(Duration::from_millis(50)).await;
            running.store(true, Ordering::Relaxed);
            let began = Instant::now();
            let summary = handle.reload(next).await.unwrap();
            let took = began.elapsed();
            running.store(false, Ordering::Relaxed);
            let d = during.lock().unwrap();
            let slowest = d.latencies.iter().max().copied().unwrap_or_default();
            println!(
                "| {what} (kept {}, added {}, removed {}) | **{:.0} ms** | {} | {:.1} ms |",
                summary.kept,
                summary.added,
                summary.removed,
                took.as_secs_f64() * 1000.0,
                d.latencies.len(),
                slowest.as_secs_f64() * 1000.0
            );
        }
    });
}
