//! The simulator behaves as the real API where qbproxy depends on it.

mod common;

use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy::signer::{self, Params};
use qbproxy::sim::Sim;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn params(sim: &Sim, ts: u64, nonce: &str) -> Params {
    let app = sim.config();
    Params::new()
        .str("application_id", app.application_id.as_str())
        .str("auth_key", app.auth_key.as_str())
        .str("timestamp", ts.to_string())
        .str("nonce", nonce)
}

async fn create(sim: &Sim, body: String, content_type: &str) -> common::Answer {
    let client = common::client();
    common::send(
        &client,
        sim.addr(),
        Method::POST,
        "/session.json",
        &[("Content-Type", content_type)],
        Bytes::from(body),
    )
    .await
}

async fn get(sim: &Sim, token: &str) -> StatusCode {
    let client = common::client();
    common::send(
        &client,
        sim.addr(),
        Method::GET,
        "/users.json",
        &[("QB-Token", token)],
        Bytes::new(),
    )
    .await
    .status
}

#[tokio::test]
async fn signatures_nonces_and_timestamps_are_checked() {
    let sim = common::demo_sim().await;
    let secret = sim.config().auth_secret.clone();
    let p = params(&sim, now(), "1");
    let signed = p
        .clone()
        .str("signature", signer::sign(&secret, &p))
        .to_json()
        .to_string();
    assert_eq!(
        create(&sim, signed.clone(), "application/json")
            .await
            .status,
        StatusCode::CREATED
    );
    // The same timestamp and nonce again.
    let again = create(&sim, signed, "application/json").await;
    assert_eq!(again.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A wrong signature.
    let bad = p
        .clone()
        .str("signature", signer::sign("wrong", &p))
        .to_json()
        .to_string();
    let a = create(&sim, bad, "application/json").await;
    assert_eq!(
        (a.status, a.text().contains("Unexpected signature")),
        (StatusCode::UNPROCESSABLE_ENTITY, true)
    );
    // A timestamp more than an hour off.
    let old = params(&sim, now() - 3700, "2");
    let body = old
        .clone()
        .str("signature", signer::sign(&secret, &old))
        .to_json()
        .to_string();
    let a = create(&sim, body, "application/json").await;
    assert!(a.text().contains("Bad timestamp"), "{}", a.text());
    // Form-encoded bodies, values signed raw (the login has a space and '&').
    let p = params(&sim, now(), "3");
    let p = p.map("user", &[("login", "demo"), ("password", "demo-password")]);
    let sig = signer::sign(&secret, &p);
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("application_id", &sim.config().application_id)
        .append_pair("auth_key", &sim.config().auth_key)
        .append_pair("timestamp", &now().to_string())
        .append_pair("nonce", "3")
        .append_pair("user[login]", "demo")
        .append_pair("user[password]", "demo-password")
        .append_pair("signature", &sig)
        .finish();
    let a = create(&sim, form, "application/x-www-form-urlencoded").await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    assert_eq!(a.json()["session"]["user_id"], 1001);
}

#[tokio::test]
async fn expiry_slides_with_use_and_lapses_two_hours_after_the_last() {
    let sim = common::demo_sim().await;
    let secret = sim.config().auth_secret.clone();
    let p = params(&sim, now(), "9");
    let body = p
        .clone()
        .str("signature", signer::sign(&secret, &p))
        .to_json()
        .to_string();
    let token = create(&sim, body, "application/json").await.json()["session"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Used every 1h50m, it lives on: 1h50m, 3h40m, 5h30m.
    for step in 1..=3 {
        sim.set_clock_offset(step * 6600);
        assert_eq!(get(&sim, &token).await, StatusCode::OK, "step {step}");
    }
    // 2h01m after the last use: gone.
    sim.set_clock_offset(3 * 6600 + 7260);
    assert_eq!(get(&sim, &token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&sim, "never-issued").await, StatusCode::UNAUTHORIZED);
    assert_eq!(sim.refusals(), 2);
}

#[tokio::test]
async fn a_request_dropped_while_held_at_a_gate_is_counted_out() {
    use tokio::io::AsyncWriteExt;
    let h = common::setup().start().await;
    h.ready().await;
    let _gate = h.sim.gate("/slow");
    let mut s = tokio::net::TcpStream::connect(h.sim.addr()).await.unwrap();
    let request = format!(
        "GET /slow.json HTTP/1.1\r\nHost: sim\r\nQB-Token: {}\r\n\r\n",
        h.token()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    common::bounded(
        "the request to be held",
        h.sim.wait_until(|s| s.held_at_gates() == 1),
    )
    .await;
    // The client goes away; the simulator drops the request it was holding.
    drop(s);
    common::bounded(
        "the request to be counted out",
        h.sim.wait_until(|s| s.held_at_gates() == 0),
    )
    .await;
    assert_eq!(h.sim.max_held_at_gates(), 1);
}
