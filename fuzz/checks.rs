//! What each fuzz target asserts, shared by the cargo-fuzz targets in
//! `fuzz_targets/` and by `tests/it/fuzz_regressions.rs`, which replays every
//! input kept in `fuzz/regressions/<target>/` on each `cargo test`.
//!
//! Every check is "no panic" plus the property named in its comment.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Any text: `Config::from_toml` answers Ok or an error of one line that
/// names the file (what `qbproxy check` prints).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = qbproxy::Config::from_toml(text, Path::new("fuzz.toml")) {
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "a config error spans lines: {msg:?}");
        assert!(
            msg.contains("fuzz.toml"),
            "a config error without the file: {msg:?}"
        );
    }
}

/// Any upstream body: expiry detection and error-message extraction
/// answer without panicking; an expiry is only ever seen in a body that
/// says "Required session does not exist".
pub fn expiry(data: &[u8]) {
    let expired = qbproxy::protocol::is_session_expired(data);
    let _ = qbproxy::protocol::error_message(data);
    if expired {
        let text = String::from_utf8_lossy(data).to_ascii_lowercase();
        assert!(text.contains("required session does not exist"), "{text:?}");
    }
}

/// Any `QB-Token-ExpirationDate` and `Date` values: parsed or refused, and
/// a remaining lifetime, when there is one, of at most the two hours a
/// session can live.
pub fn dates(data: &[u8]) {
    let (expiration, date) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let _ = qbproxy::protocol::parse_expiration(expiration);
    if let Some(date) = date {
        let _ = qbproxy::protocol::parse_http_date(date);
    }
    for now in [
        SystemTime::now(),
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(u32::MAX as u64),
    ] {
        if let Some(left) = qbproxy::protocol::remaining_lifetime(Some(expiration), date, now) {
            assert!(left <= qbproxy::protocol::SESSION_LIFETIME, "{left:?}");
        }
    }
}

/// Any bytes sent to the proxy as a client request (one proxy and one
/// simulator for the whole fuzzing run): the proxy answers with an HTTP
/// response or closes the connection, never panics (the hook below turns a
/// panic on any of the proxy's threads into an abort), and goes on serving
/// a good request.
pub fn forwarding(data: &[u8]) {
    let proxy = *PROXY.get_or_init(start_proxy);
    if let Ok(mut conn) = TcpStream::connect(proxy) {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = conn.write_all(data);
        let _ = conn.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        // Clients that open with HTTP/2's preface (h2c, prior knowledge)
        // are answered in HTTP/2: frames, starting with SETTINGS (type 4).
        let h2 = data.starts_with(H2_PREFACE) && answer.get(3) == Some(&4);
        assert!(
            answer.is_empty()
                || h2
                || answer.starts_with(b"HTTP/1.1 ")
                || answer.starts_with(b"HTTP/1.0 "),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    let mut conn = TcpStream::connect(proxy).expect("the proxy still accepts");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"GET /users.json HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 200 "),
        "the proxy stopped serving: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(300)])
    );
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static PROXY: OnceLock<SocketAddr> = OnceLock::new();

fn start_proxy() -> SocketAddr {
    // A panic in a proxy task would be caught by tokio and go unseen: make
    // it an abort the fuzzer reports. Only on the proxy's threads: the
    // regression tests share their process with every other test.
    const THREAD: &str = "fuzzed-proxy";
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if std::thread::current().name() == Some(THREAD) {
            std::process::abort();
        }
    }));
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(THREAD.into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREAD)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let sim = qbproxy_sim::Sim::start(qbproxy_sim::SimConfig::demo())
                .await
                .unwrap();
            let c = sim.config();
            let text = format!(
                "[upstream]\nurl = \"{}\"\n[quickblox]\napplication_id = \"{}\"\nauth_key = \"{}\"\n\
                 auth_secret = \"{}\"\n[[identity]]\nname = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n",
                sim.url(),
                c.application_id,
                c.auth_key,
                c.auth_secret,
            );
            let config = qbproxy::Config::from_toml(&text, Path::new("fuzz.toml")).unwrap();
            let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = proxy.local_addr().unwrap();
            let app = qbproxy::App::new(config).unwrap();
            let handle = app.handle();
            tokio::spawn(app.run(
                qbproxy::Listeners { proxy, admin, workers: Vec::new(), handover: None },
                std::future::pending::<()>(),
            ));
            handle.ready().await;
            tx.send(addr).unwrap();
            let _sim = sim;
            std::future::pending::<()>().await;
        });
    });
    spawned.expect("the proxy's thread started");
    rx.recv().expect("the proxy started")
}

/// Any bytes as a request path: `canonical::path` answers without
/// panicking; what it accepts is a fixed point that starts with '/', holds
/// no dot segment, empty segment but a trailing one, or encoded unreserved
/// character; and `key_is` agrees with `route_key`.
pub fn canonical(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    use qbproxy::rules::{key_is, path, route_key};
    let Ok(c) = path(raw) else {
        return;
    };
    assert!(c.starts_with('/'), "{c:?}");
    assert_eq!(path(&c).unwrap(), c, "not a fixed point: {raw:?}");
    let segments: Vec<&str> = c[1..].split('/').collect();
    for (i, s) in segments.iter().enumerate() {
        assert!(*s != "." && *s != "..", "dot segment left in {c:?}");
        assert!(
            !s.is_empty() || i + 1 == segments.len(),
            "empty segment in {c:?}"
        );
    }
    let key = route_key(&c);
    for probe in ["/session", "/login", "/users", "/"] {
        assert_eq!(key_is(&c, probe), key == probe, "{c:?} vs {probe}");
    }
}

/// Any body, split anywhere: the `_method` scanner finds the same thing
/// whether the body comes whole or in pieces, and finds it exactly when the
/// body, percent-decoded once with backslashes dropped, spells `_method` in
/// any case (a reading of the whole body, not streamed).
pub fn form(data: &[u8]) {
    use qbproxy::rules::Scanner;
    let split = data.first().map_or(1, |b| (*b as usize % 17) + 1);
    let scan = |size: usize| {
        let mut s = Scanner::new();
        for chunk in data.chunks(size) {
            if s.feed(chunk).is_some() {
                break;
            }
        }
        s.finish().is_some()
    };
    let whole = scan(data.len().max(1));
    assert_eq!(whole, scan(split), "chunks of {split}");
    let text = String::from_utf8_lossy(data);
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(&text)
        .filter(|b| *b != b'\\')
        .map(|b| b.to_ascii_lowercase())
        .collect();
    let expected = decoded.windows(7).any(|w| w == b"_method");
    assert_eq!(whole, expected, "{text:?}");
}
