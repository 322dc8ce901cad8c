//! Several identities behind one proxy: kinds, selection, token commands,
//! the admin API.

use crate::common;

use std::collections::HashMap;

use crate::common::{bounded, setup};
use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy_sim::{ProviderToken, Sim, SimConfig};

fn fb(token: &str, user_id: u64) -> ProviderToken {
    ProviderToken {
        provider: "facebook".into(),
        project_id: None,
        token: token.into(),
        user_id,
    }
}

const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
const OTHER: &str =
    "name = \"other\"\nemail = \"other@example.com\"\npassword = \"other-password\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identities_used_concurrently_each_get_their_own_token() {
    let h = setup().identity(DEMO).identity(OTHER).start().await;
    h.ready().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let who = if i % 2 == 0 { "demo" } else { "other" };
        tasks.push((
            who,
            h.spawn_send(
                Method::GET,
                format!("/users.json?i={i}"),
                &[("QBProxy-Identity", who)],
                "",
            ),
        ));
    }
    for (who, t) in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let expected = if who == "demo" { 1001 } else { 1002 };
        assert_eq!(a.json()["echo"]["user_id"], expected, "{who}");
    }
    // The simulator knows which user owns which token: one token per user.
    let mut tokens: HashMap<u64, std::collections::HashSet<String>> = HashMap::new();
    for r in h.sim.requests() {
        assert!(
            !r.headers.contains_key("qbproxy-identity"),
            "selection header forwarded"
        );
        tokens.entry(r.user_id).or_default().insert(r.token);
    }
    assert_eq!(tokens.len(), 2);
    assert!(tokens.values().all(|t| t.len() == 1));
    assert_eq!(h.sim.creations(), 2);
}

#[tokio::test]
async fn every_identity_kind_creates_a_signed_session() {
    let mut sim_cfg = SimConfig::demo();
    sim_cfg.provider_tokens = vec![
        fb("fb-token-1", 2001),
        ProviderToken {
            provider: "firebase_phone".into(),
            project_id: Some("proj-42".into()),
            token: "eyJhbGciOiJSUzI1NiJ9.e30.sig".into(),
            user_id: 2002,
        },
    ];
    let sim = Sim::start(sim_cfg).await.unwrap();
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .identity(OTHER)
        .identity("name = \"reader\"\n")
        .identity("name = \"fb\"\nprovider = \"facebook\"\ntoken = \"fb-token-1\"\nsecret = \"fb-secret\"\n")
        .identity(
            "name = \"phone\"\nprovider = \"firebase_phone\"\nproject_id = \"proj-42\"\n\
             access_token = \"eyJhbGciOiJSUzI1NiJ9.e30.sig\"\n",
        )
        .start()
        .await;
    let expected = [
        ("demo", 1001),
        ("other", 1002),
        ("reader", 0),
        ("fb", 2001),
        ("phone", 2002),
    ];
    for (name, user_id) in expected {
        let a = h.get_as(name, "/users.json").await;
        assert_eq!(a.status, StatusCode::OK, "{name}: {}", a.text());
        assert_eq!(a.json()["echo"]["user_id"], user_id, "{name}");
    }
    // Each was accepted by the simulator's own signature check; the provider
    // parameters went as QuickBlox expects them.
    let log = h.sim.creation_log();
    assert_eq!(log.len(), 5);
    let params = |user: u64| -> HashMap<String, String> {
        log.iter()
            .find(|c| c.user_id == user)
            .unwrap()
            .params
            .iter()
            .cloned()
            .collect()
    };
    assert_eq!(params(1001)["user[login]"], "demo");
    assert_eq!(params(1002)["user[email]"], "other@example.com");
    assert!(!params(0).contains_key("user[login]"));
    assert_eq!(params(2001)["provider"], "facebook");
    assert_eq!(params(2001)["keys[secret]"], "fb-secret");
    assert_eq!(params(2002)["provider"], "firebase_phone");
    assert_eq!(params(2002)["firebase_phone[project_id]"], "proj-42");
}

#[tokio::test]
async fn writes_through_an_application_identity_pass_through_and_are_logged() {
    let logs = common::capture_logs();
    let h = setup()
        .identity(DEMO)
        .identity("name = \"reader\"\n")
        .start()
        .await;
    h.ready().await;
    let a = h
        .send(
            Method::POST,
            "/data/Note.json",
            &[("QBProxy-Identity", "reader")],
            "{}",
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.text(), r#"{"errors":{"base":["Forbidden. Need user."]}}"#);
    assert!(
        !a.headers.contains_key("qbproxy-error"),
        "QuickBlox's answer, unchanged"
    );
    let text = logs.text();
    assert!(
        text.contains("identity=\"reader\"") && text.contains("application identity"),
        "{text}"
    );
}

#[tokio::test]
async fn token_commands_are_read_afresh_and_failures_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "fb-rotating-1\n").unwrap();
    let mut sim_cfg = SimConfig::demo();
    sim_cfg.provider_tokens = vec![fb("fb-rotating-1", 2001)];
    let sim = Sim::start(sim_cfg).await.unwrap();
    let h = setup()
        .sim(sim)
        .identity(&format!(
            "name = \"fb\"\nprovider = \"facebook\"\ntoken_command = \"cat {}\"\n",
            file.display()
        ))
        .identity("name = \"broken\"\nprovider = \"facebook\"\ntoken_command = \"echo nope >&2; exit 3\"\n")
        .start()
        .await;
    h.ready().await;
    let last_token = |sim: &Sim| {
        sim.creation_log().last().and_then(|c| {
            c.params
                .iter()
                .find(|(k, _)| k == "keys[token]")
                .map(|(_, v)| v.clone())
        })
    };
    assert_eq!(last_token(&h.sim).as_deref(), Some("fb-rotating-1"));

    // The token rotates; the next renewal reads the new one.
    std::fs::write(&file, "fb-rotating-2\n").unwrap();
    h.sim.add_provider_token(fb("fb-rotating-2", 2001));
    let client = common::client();
    let renew = common::send(
        &client,
        h.admin,
        Method::POST,
        "/sessions/fb/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(renew.status, StatusCode::OK, "{}", renew.text());
    assert_eq!(last_token(&h.sim).as_deref(), Some("fb-rotating-2"));
    assert_eq!(renew.json()["renewals"]["forced"], 1);

    // A failing command is reported like any session failure.
    let a = h.get_as("broken", "/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    let msg = a.error_message();
    assert_eq!(
        msg,
        "qbproxy: could not create a QuickBlox session: token command failed (exit 3)"
    );
}

#[tokio::test]
async fn identities_are_chosen_by_header_or_path_prefix_and_unknown_names_get_400() {
    let h = setup()
        .identity(DEMO)
        .identity(&format!("{OTHER}path_prefix = \"/other\"\n"))
        .start()
        .await;
    h.ready().await;
    // Default.
    assert_eq!(h.get("/users.json").await.json()["echo"]["user_id"], 1001);
    // Prefix, stripped byte for byte, query kept.
    let a = h.get("/other/users.json?filter%5B%5D=a%2Cb").await;
    assert_eq!(a.json()["echo"]["user_id"], 1002);
    assert_eq!(
        h.sim.requests().last().unwrap().path_and_query,
        "/users.json?filter%5B%5D=a%2Cb"
    );
    // A prefix must end at a segment boundary.
    let a = h.get("/otherwise.json").await;
    assert_eq!(a.json()["echo"]["user_id"], 1001);
    assert_eq!(
        h.sim.requests().last().unwrap().path_and_query,
        "/otherwise.json"
    );
    // The guard sees the stripped path.
    let a = h
        .send(Method::DELETE, "/other/session.json", &[], Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Unknown name.
    let a = h.get_as("nobody", "/users.json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.headers["qbproxy-error"], "unknown-identity");
    assert_eq!(
        a.error_message(),
        "qbproxy: unknown identity \"nobody\"; valid names: demo, other"
    );
}

#[tokio::test]
async fn sessions_endpoint_shows_state_but_never_a_token() {
    let h = setup()
        .identity(DEMO)
        .identity("name = \"bad\"\nlogin = \"demo\"\npassword = \"wrong\"\n")
        .start()
        .await;
    h.ready().await;
    bounded(
        "the bad identity's failure",
        h.sim.wait_until(|s| s.attempts() >= 2),
    )
    .await;
    let a = h.admin_get("/sessions").await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    let list = v["identities"].as_array().unwrap();
    let demo = list.iter().find(|i| i["name"] == "demo").unwrap();
    assert_eq!(demo["kind"], "login");
    assert_eq!(demo["state"], "ready");
    assert_eq!(demo["user_id"], 1001);
    assert_eq!(demo["renewals"]["startup"], 1);
    let token = h.token();
    assert_eq!(demo["token"], format!("{}…", &token[..6]));
    assert!(demo["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(demo["expires_at"].as_str().unwrap() > demo["created_at"].as_str().unwrap());
    bounded("the bad identity's state", async {
        loop {
            let v = h.admin_get("/sessions").await.json();
            let bad = v["identities"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == "bad")
                .cloned()
                .unwrap();
            if bad["last_error"].is_string() {
                assert_eq!(bad["state"], "failing");
                assert!(bad["last_error"].as_str().unwrap().contains("Unauthorized"));
                break;
            }
            h.sim.wait_until(|s| s.attempts() > 2).await;
        }
    })
    .await;
    for r in h.sim.requests() {
        assert!(!a.text().contains(&r.token));
    }
    assert!(!a.text().contains(&token));
    assert!(!a.text().contains("demo-password"));

    // Forcing a renewal: the new session is shown; an unknown name is 404.
    let client = common::client();
    let r = common::send(
        &client,
        h.admin,
        Method::POST,
        "/sessions/demo/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["renewals"]["forced"], 1);
    assert_ne!(h.token(), token);
    let r = common::send(
        &client,
        h.admin,
        Method::POST,
        "/sessions/bad/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error_message().contains("Unauthorized"), "{}", r.text());
    let r = common::send(
        &client,
        h.admin,
        Method::POST,
        "/sessions/nobody/renew",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// An identity stuck creating its session does not hold up another's
/// requests.
#[tokio::test]
async fn one_identitys_failure_never_blocks_another() {
    let h = setup()
        .identity(DEMO)
        .identity("name = \"stuck\"\nprovider = \"facebook\"\ntoken_command = \"sleep 60\"\ncommand_timeout = \"50s\"\n")
        .identity("name = \"refused\"\nlogin = \"demo\"\npassword = \"wrong\"\n")
        .start()
        .await;
    h.ready().await;
    let stuck = h.spawn_send(
        Method::GET,
        "/users.json",
        &[("QBProxy-Identity", "stuck")],
        "",
    );
    let refused = h.get_as("refused", "/users.json").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    for i in 0..10 {
        let a = h.get(&format!("/users.json?{i}")).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    assert!(
        !stuck.is_finished(),
        "the stuck identity's request is still waiting for its session"
    );
    stuck.abort();
}
