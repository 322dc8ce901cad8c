//! Reloading the configuration in place (what SIGHUP does; the signal
//! itself is tested on the binary in `cli.rs`).

use crate::common;
use std::time::Duration;

use std::path::Path;

use crate::common::{bounded, setup};
use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy::Config;
use qbproxy_sim::Fault;

const KEY_A: &str = "client-a-key-0123456789";
const KEY_B: &str = "client-b-key-0123456789";
const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
const OTHER: &str = "name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n";

fn client(name: &str, key: &str) -> String {
    format!("[[client]]\nname = \"{name}\"\nkey = \"{key}\"\n")
}

/// A config for the harness's simulator built from a setup.
fn config(h: &common::Harness, s: common::Setup) -> Config {
    Config::from_toml(&s.config_text(&h.sim), Path::new("reloaded.toml")).unwrap()
}

#[tokio::test]
async fn a_rotated_password_takes_effect_at_the_next_renewal_without_disturbing_the_session() {
    let h = setup().identity(DEMO).start().await;
    h.ready().await;
    let token = h
        .handle
        .default_identity()
        .current()
        .unwrap()
        .token()
        .clone();
    // The password changes in QuickBlox, then in the config.
    h.sim.set_password("demo", "rotated-password");
    let rotated =
        setup().identity("name = \"demo\"\nlogin = \"demo\"\npassword = \"rotated-password\"\n");
    h.handle.reload(config(&h, rotated)).await.unwrap();
    // The healthy session is untouched.
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(
        h.handle.default_identity().current().unwrap().token(),
        &token
    );
    assert_eq!(h.sim.creations(), 1);
    // The next renewal uses the new password.
    h.sim.expire_all();
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let last = h.sim.creation_log().last().unwrap().params.clone();
    assert!(last.contains(&("user[password]".to_owned(), "rotated-password".to_owned())));
}

#[tokio::test]
async fn client_keys_allowlist_and_limits_change_at_once() {
    let h = setup().raw_table(&client("a", KEY_A)).start().await;
    h.ready().await;
    let with = |key: &'static str| [("QBProxy-Key", key)];
    assert_eq!(
        h.send(Method::GET, "/data/X.json", &with(KEY_A), Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.send(Method::GET, "/data/X.json", &with(KEY_B), Bytes::new())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Key B added, key A removed, bodies limited.
    let next = setup()
        .raw_table(&client("b", KEY_B))
        .set("limits", "max_body_bytes", 100);
    h.handle.reload(config(&h, next)).await.unwrap();
    assert_eq!(
        h.send(Method::GET, "/data/X.json", &with(KEY_B), Bytes::new())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        h.send(Method::GET, "/data/X.json", &with(KEY_A), Bytes::new())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let big = h
        .send(Method::POST, "/data/X.json", &with(KEY_B), vec![b'x'; 101])
        .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Only other hosts allowed.
    let closed = setup()
        .raw_table(&client("b", KEY_B))
        .set("listen", "allow", ["10.0.0.0/8"]);
    h.handle.reload(config(&h, closed)).await.unwrap();
    assert_eq!(
        h.send(Method::GET, "/data/X.json", &with(KEY_B), Bytes::new())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // The default identity's session survived all of it.
    assert_eq!(h.sim.creations(), 1);
}

#[tokio::test]
async fn identities_come_and_go_and_requests_in_flight_finish() {
    let h = setup().identity(DEMO).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let in_flight = h.spawn_send(Method::GET, "/data/Slow.json", &[], "");
    common::bounded(
        "the held request",
        h.sim.wait_until(|s| s.requests_to("/data/Slow") == 1),
    )
    .await;

    // "other" arrives.
    h.handle
        .reload(config(&h, setup().identity(DEMO).identity(OTHER)))
        .await
        .unwrap();
    let a = h.get_as("other", "/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["echo"]["user_id"], 1002);

    // "other" leaves; its name is unknown again.
    h.handle
        .reload(config(&h, setup().identity(DEMO)))
        .await
        .unwrap();
    let a = h.get_as("other", "/users.json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // The request that was in flight through all of it completes.
    gate.add_permits(1);
    assert_eq!(in_flight.await.unwrap().status, StatusCode::OK);
    assert_eq!(
        h.sim.creations_for(1001),
        1,
        "demo's session was never replaced"
    );
}

/// The listen addresses cannot move without a restart; a reload says so.
#[tokio::test]
async fn a_moved_listen_address_is_logged_as_needing_a_restart() {
    let logs = common::capture_logs();
    let h = setup().start().await;
    h.ready().await;
    h.handle
        .reload(config(&h, setup().set("listen", "addr", "127.0.0.1:3")))
        .await
        .unwrap();
    assert!(
        logs.has_line(&["listen.addr changed", "restart qbproxy", "127.0.0.1:3"]),
        "{}",
        logs.text()
    );
    // Still serving where it was.
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
}

/// Resolves once `n` requests in all have had to wait for an upstream slot.
async fn slot_waits(h: &common::Harness, n: u64) {
    h.metric_reaches("qbproxy_upstream_slot_waits_total", n)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_across_a_reload_count_against_one_upstream_cap() {
    let capped = || setup().identity(DEMO).set("upstream", "max_in_flight", 2);
    let h = capped().start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let mut sent: Vec<_> = (0..2)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Slow{i}.json"), &[], ""))
        .collect();
    h.sim.wait_until(|s| s.requests_to("/data/Slow") >= 2).await;
    h.handle.reload(config(&h, capped())).await.unwrap();
    // Both slots are still held: the next request waits for one of them.
    sent.push(h.spawn_send(Method::GET, "/data/Slow2.json", &[], ""));
    slot_waits(&h, 1).await;
    assert_eq!(h.sim.requests_to("/data/Slow"), 2);
    gate.add_permits(3);
    for s in sent {
        assert_eq!(bounded("a request", s).await.unwrap().status, 200);
    }
    assert_eq!(h.sim.max_held_at_gates(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_shrinks_and_grows_the_upstream_cap() {
    let capped = |n: u64| setup().identity(DEMO).set("upstream", "max_in_flight", n);
    let h = capped(3).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Slow");
    let held: Vec<_> = (0..3)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Slow{i}.json"), &[], ""))
        .collect();
    h.sim.wait_until(|s| s.requests_to("/data/Slow") >= 3).await;
    // Down to 1 while all 3 slots are taken: they go as their requests end.
    h.handle.reload(config(&h, capped(1))).await.unwrap();
    gate.add_permits(3);
    for s in held {
        assert_eq!(bounded("a held request", s).await.unwrap().status, 200);
    }
    let later = h.sim.gate("/data/Later");
    let mut sent: Vec<_> = (0..3)
        .map(|i| h.spawn_send(Method::GET, format!("/data/Later{i}.json"), &[], ""))
        .collect();
    // Two of them wait for a slot (with a cap above 1, fewer would), and
    // the one that has it reaches the upstream.
    slot_waits(&h, 2).await;
    bounded(
        "the one slot's request",
        h.sim.wait_until(|s| s.requests_to("/data/Later") >= 1),
    )
    .await;
    assert_eq!(h.sim.requests_to("/data/Later"), 1, "one slot left");
    // Up to 2: the next waiting request goes at once.
    h.handle.reload(config(&h, capped(2))).await.unwrap();
    bounded(
        "a second slot",
        h.sim.wait_until(|s| s.requests_to("/data/Later") >= 2),
    )
    .await;
    later.add_permits(1);
    bounded(
        "a freed slot",
        h.sim.wait_until(|s| s.requests_to("/data/Later") >= 3),
    )
    .await;
    later.add_permits(2);
    for s in sent.drain(..) {
        assert_eq!(bounded("a later request", s).await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn a_reload_applies_the_retry_policy_to_identities_that_stay() {
    let with_wait = |wait: Duration| {
        setup()
            .identity(DEMO)
            .set("quickblox", "retry_initial", Duration::from_millis(50))
            .set("quickblox", "retry_wait", wait)
    };
    let h = with_wait(Duration::ZERO).start().await;
    h.ready().await;
    h.handle
        .reload(config(&h, with_wait(Duration::from_secs(10))))
        .await
        .unwrap();
    // The session dies and the next two creations fail: with the reloaded
    // retry_wait the request rides them out (with "0s" it would get a 503).
    for _ in 0..2 {
        h.sim
            .push_fault(Fault::Status(500, "{\"errors\":[\"boom\"]}".into()));
    }
    h.sim.expire_all();
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.sim.attempts(), 4);
}

/// Issue 11, defect 3: shrinking `limits.max_connections` from 4 to 1 while
/// every slot is busy leaves a cap of 1 once they finish (the permits that
/// could not be taken back at once used to return to the pool).
#[tokio::test]
async fn a_smaller_connection_cap_holds_once_busy_connections_finish() {
    let h = setup().set("limits", "max_connections", 4).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Held");
    let held = |proxy| {
        tokio::spawn(common::raw(
            proxy,
            b"GET /data/Held.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ))
    };
    let busy: Vec<_> = (0..3).map(|_| held(h.proxy)).collect();
    h.sim.wait_until(|s| s.held_at_gates() == 3).await;
    h.handle
        .reload(config(&h, setup().set("limits", "max_connections", 1)))
        .await
        .unwrap();
    // The fourth slot was taken before the reload, waiting for a client:
    // every slot is busy when the accept loop next looks.
    let mut busy = busy;
    busy.push(held(h.proxy));
    h.sim.wait_until(|s| s.held_at_gates() == 4).await;
    gate.add_permits(4);
    for b in busy {
        assert!(bounded("a busy answer", b)
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }
    // Two new clients: one is served, the other waits in the accept queue.
    let next: Vec<_> = (0..2).map(|_| held(h.proxy)).collect();
    h.sim.wait_until(|s| s.held_at_gates() == 1).await;
    // Time for the second to get in, had the cap been left at 3.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(h.sim.held_at_gates(), 1, "the cap is 1");
    gate.add_permits(2);
    for n in next {
        assert!(bounded("the answer", n)
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }
}

/// Issue 11, defect 3: a larger connection cap applies at once, while every
/// slot is busy (the accept loop used to see it only after one freed).
#[tokio::test]
async fn a_larger_connection_cap_applies_while_every_slot_is_busy() {
    let h = setup().set("limits", "max_connections", 1).start().await;
    h.ready().await;
    let gate = h.sim.gate("/data/Held");
    let held = |proxy| {
        tokio::spawn(common::raw(
            proxy,
            b"GET /data/Held.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ))
    };
    let first = held(h.proxy);
    h.sim.wait_until(|s| s.held_at_gates() == 1).await;
    let second = held(h.proxy);
    h.handle
        .reload(config(&h, setup().set("limits", "max_connections", 2)))
        .await
        .unwrap();
    // The second client is served while the first is still held.
    bounded(
        "the second client to be served",
        h.sim.wait_until(|s| s.held_at_gates() == 2),
    )
    .await;
    gate.add_permits(2);
    for a in [first, second] {
        assert!(bounded("the answer", a)
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }
}

/// Issue 11, defect 2: a reload that changes nothing about `[upstream]`
/// keeps the upstream client and its warm connections.
#[tokio::test]
async fn the_upstream_client_and_its_connections_survive_a_reload() {
    let h = setup().start().await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let connections = h.sim.connections();
    let summary = h
        .handle
        .reload(config(&h, setup().set("limits", "max_header_bytes", 4096)))
        .await
        .unwrap();
    assert!(summary.client_kept);
    assert_eq!(summary.kept, 1);
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(
        h.sim.connections(),
        connections,
        "no new connection upstream"
    );
    // A changed [upstream] does get a new client.
    let summary = h
        .handle
        .reload(config(
            &h,
            setup().set("upstream", "pool_idle_timeout", Duration::from_secs(60)),
        ))
        .await
        .unwrap();
    assert!(!summary.client_kept);
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(h.sim.connections(), connections + 1);
}

/// Issue 11, defect 2: a large reload (a pool of 20,000 members) reads its
/// files and builds off the async threads, and runs alone. Its secret file
/// here is a FIFO, so the reload blocks until the test writes to it:
/// meanwhile a request is answered (on this one-thread runtime, as with
/// `--threads 1`), and a second reload waits its turn.
#[tokio::test]
async fn requests_are_answered_during_a_reload_and_reloads_run_one_at_a_time() {
    let h = setup().start().await;
    h.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("auth-secret");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let secret = h.sim.config().auth_secret.clone();
    let first = setup()
        .pool_table("name = \"load\"\nlogin = \"lt-{n}\"\ncount = 20000\npassword = \"pw\"\n")
        .set("limits", "max_header_bytes", 4096)
        .set("quickblox", "auth_secret_file", &fifo)
        .set("quickblox", "auth_secret", "unused")
        .config_text(&h.sim)
        .replace("auth_secret = \"unused\"\n", "");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, first).unwrap();
    let reloading = tokio::spawn({
        let (handle, file) = (h.handle.clone(), file.clone());
        async move { handle.reload_file(&file).await }
    });
    let second = tokio::spawn({
        let handle = h.handle.clone();
        let next = config(&h, setup().set("limits", "max_header_bytes", 2048));
        async move { handle.reload(next).await }
    });
    // The first reload is blocked reading the FIFO; traffic goes on.
    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(!reloading.is_finished() && !second.is_finished());
    // Unblock it: both finish, in the order asked.
    tokio::task::spawn_blocking(move || std::fs::write(&fifo, format!("{secret}\n")))
        .await
        .unwrap()
        .unwrap();
    bounded("the first reload", reloading)
        .await
        .unwrap()
        .unwrap();
    bounded("the second reload", second).await.unwrap().unwrap();
    assert_eq!(h.handle.config(|c| c.limits.max_header_bytes), 2048);
}
