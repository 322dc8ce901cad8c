//! API-key identities: `Authorization: ApiKey <key>` and `On-Behalf-Of`
//! instead of a session, with everything else that applies to any
//! identity (the guard, pools, metrics, `/sessions`, reload). Every test
//! asserts what the simulator received.

use crate::common;

use std::path::Path;

use crate::common::{bounded, last_received, setup};
use http::{Method, StatusCode};
use qbproxy::Config;
use qbproxy_sim::{Sim, SimConfig};

const SVC: &str = "name = \"svc\"\napi_key = \"demo-api-key\"\non_behalf_of = 1001\n";

async fn sim_with_keys(keys: &[&str]) -> Sim {
    let mut config = SimConfig::demo();
    config.api_keys = keys.iter().map(|k| (*k).to_owned()).collect();
    Sim::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_identity_sends_its_key_and_user_and_creates_no_session() {
    let dir = std::env::temp_dir().join(format!("qbproxy-apikey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, "demo-api-key\n").unwrap();
    let h = setup()
        .identity(SVC)
        .identity(&format!("name = \"admin\"\napi_key_file = {key_file:?}\n"))
        .start()
        .await;
    h.ready().await;

    let a = h.get("/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["echo"]["user_id"], 1001);
    assert_eq!(
        last_received(&h.sim, "authorization"),
        ["ApiKey demo-api-key"]
    );
    assert_eq!(last_received(&h.sim, "on-behalf-of"), ["1001"]);
    assert!(last_received(&h.sim, "qb-token").is_empty());

    // A write on behalf of a user works; the application's key (no
    // On-Behalf-Of) reads as the application.
    let a = h
        .send(
            Method::POST,
            "/chat/Dialog.json",
            &[],
            r#"{"type":1,"name":"x"}"#,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = h.get_as("admin", "/users.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["echo"]["user_id"], 0);
    assert_eq!(
        last_received(&h.sim, "authorization"),
        ["ApiKey demo-api-key"]
    );
    assert!(last_received(&h.sim, "on-behalf-of").is_empty());

    // No session was ever asked for, and none can expire.
    h.sim.expire_all();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(h.sim.attempts(), 0, "no POST /session.json for an API key");
    assert_eq!(h.metric("qbproxy_replays_total{identity=\"svc\""), 0);
    assert_eq!(
        h.metric("qbproxy_requests_total{code=\"200\",identity=\"svc\""),
        3
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_refused_api_key_is_passed_on_and_never_replayed() {
    let h = setup()
        .identity(SVC)
        .identity("name = \"revoked\"\napi_key = \"revoked-key\"\n")
        .start()
        .await;
    h.ready().await;
    let a = h.get_as("revoked", "/users.json").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error_message(), "Unauthorized", "QuickBlox's own answer");
    assert!(a.headers.get("qbproxy-error").is_none());
    assert_eq!(h.sim.attempts(), 0);
    assert_eq!(h.metric("qbproxy_replays_total{identity=\"revoked\""), 0);
    // The other identity is untouched.
    assert_eq!(h.get_as("svc", "/users.json").await.status, StatusCode::OK);
}

#[tokio::test]
async fn sessions_and_session_json_show_an_api_key_identity_without_its_key() {
    let logs = common::capture_logs();
    let h = setup().identity(SVC).start().await;
    h.ready().await;
    let a = h.admin_get("/sessions").await;
    let v = a.json();
    let svc = &v["identities"][0];
    assert_eq!(svc["kind"], "api_key");
    assert_eq!(svc["state"], "ready");
    assert_eq!(svc["user_id"], 1001);
    assert_eq!(svc["token"], "demo-a…");
    assert!(
        svc["expires_at"].is_null(),
        "an API key never expires: {svc}"
    );

    // `GET /session.json` is answered by qbproxy: who it acts as, no key.
    let a = h.get("/session.json").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["qbproxy-answered"], "session");
    assert_eq!(a.json()["session"]["user_id"], 1001);
    assert!(h.sim.requests().is_empty());
    // The guard holds as for any identity: nothing touches a session.
    for (method, path) in [
        (Method::DELETE, "/session.json"),
        (Method::POST, "/login.json"),
    ] {
        let a = h.send(method, path, &[], "{}").await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(a.headers["qbproxy-error"], "shared-session");
    }
    assert!(h.sim.requests().is_empty());

    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    let everything = [
        a.text(),
        h.admin_get("/sessions").await.text(),
        h.admin_get("/metrics").await.text(),
        logs.text(),
    ];
    for text in everything {
        assert!(!text.contains("demo-api-key"), "the key leaked: {text}");
    }
    assert!(logs.has_line(&["API key in use", "svc", "demo-a…"]));
}

#[tokio::test]
async fn a_reload_puts_a_new_key_or_user_in_use_before_it_returns() {
    let sim = sim_with_keys(&["key-one", "key-two"]).await;
    let with = |key: &str, user: u64| {
        setup().sim(sim.clone()).identity(&format!(
            "name = \"svc\"\napi_key = \"{key}\"\non_behalf_of = {user}\n"
        ))
    };
    let h = with("key-one", 1001).start().await;
    h.ready().await;
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(last_received(&sim, "authorization"), ["ApiKey key-one"]);

    let reloaded = |s: common::Setup| Config::from_toml(&s.config_text(&sim), Path::new("r.toml"));
    let summary = h
        .handle
        .reload(reloaded(with("key-two", 1001)).unwrap())
        .await
        .unwrap();
    assert_eq!(summary.kept, 1, "the identity stays");
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(last_received(&sim, "authorization"), ["ApiKey key-two"]);

    h.handle
        .reload(reloaded(with("key-two", 1002)).unwrap())
        .await
        .unwrap();
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(last_received(&sim, "on-behalf-of"), ["1002"]);

    // An unchanged key changes nothing: no renewal is counted.
    let forced = "qbproxy_session_renewals_total{identity=\"svc\",pool=\"\",reason=\"forced\"}";
    assert_eq!(h.metric(forced), 2);
    h.handle
        .reload(reloaded(with("key-two", 1002)).unwrap())
        .await
        .unwrap();
    assert_eq!(h.metric(forced), 2);
}

#[tokio::test]
async fn a_pool_of_api_keys_takes_turns() {
    let sim = sim_with_keys(&["key-one", "key-two"]).await;
    let h = setup()
        .sim(sim.clone())
        .identity("name = \"k1\"\napi_key = \"key-one\"\n")
        .identity("name = \"k2\"\napi_key = \"key-two\"\n")
        .pool_table("name = \"keys\"\nidentities = [\"k1\", \"k2\"]\npath_prefix = \"/keys\"\n")
        .start()
        .await;
    h.ready().await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let a = bounded("a pooled request", h.get("/keys/users.json")).await;
        assert_eq!(a.status, StatusCode::OK);
        seen.extend(last_received(&sim, "authorization"));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "ApiKey key-one",
            "ApiKey key-one",
            "ApiKey key-two",
            "ApiKey key-two"
        ]
    );
    assert_eq!(sim.attempts(), 0);
    for member in ["k1", "k2"] {
        let series =
            format!("qbproxy_requests_total{{code=\"200\",identity=\"{member}\",pool=\"keys\"}}");
        assert_eq!(h.metric(&series), 2, "{series}");
    }
}

/// A client's rules hold for an API-key identity as for any other: the
/// identities it may use and the paths it may not touch.
#[tokio::test]
async fn a_clients_rules_hold_for_an_api_key_identity() {
    let key = "reporting-key-0123456789";
    let h = setup()
        .identity(SVC)
        .identity("name = \"admin\"\napi_key = \"demo-api-key\"\n")
        .raw_table(&format!(
            "[[client]]\nname = \"reporting\"\nkey = \"{key}\"\nidentities = [\"svc\"]\n\
             deny_paths = [\"DELETE /users/*\"]\n"
        ))
        .start()
        .await;
    h.ready().await;
    let a = h
        .send(
            Method::DELETE,
            "/users/1002.json",
            &[("QBProxy-Key", key)],
            "",
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QBProxy-Key", key), ("QBProxy-Identity", "admin")],
            "",
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert!(h.sim.requests().is_empty(), "nothing reached QuickBlox");
    let a = h
        .send(Method::GET, "/users.json", &[("QBProxy-Key", key)], "")
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(last_received(&h.sim, "on-behalf-of"), ["1001"], "as svc");
}
