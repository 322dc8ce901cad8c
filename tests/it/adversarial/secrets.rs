//! Secrets stay secret: token commands' output and environment, the admin
//! API, and what a client learns from a refusal.

use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy_sim::{ProviderToken, Sim, SimConfig};

use super::{DEMO, KEY};
use crate::common::{self, capture_logs, setup};

fn fb(token: &str) -> ProviderToken {
    ProviderToken {
        provider: "facebook".into(),
        project_id: None,
        token: token.into(),
        user_id: 2001,
    }
}

#[tokio::test]
async fn a_token_commands_stderr_reaches_the_log_only() {
    let logs = capture_logs();
    let h = setup()
        .identity(DEMO)
        .identity(
            "name = \"leaky\"\nprovider = \"facebook\"\n\
             token_command = \"echo 'adv-stderr-line password=hunter2' >&2; echo 'adv-second-line' >&2; exit 3\"\n",
        )
        .start()
        .await;
    h.ready().await;
    let a = h.get_as("leaky", "/users.json").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        a.error_message(),
        "qbproxy: could not create a QuickBlox session: token command failed (exit 3)"
    );
    assert!(!a.text().contains("hunter2"));
    let sessions = h.admin_get("/sessions").await.text();
    assert!(
        sessions.contains("token command failed (exit 3)"),
        "{sessions}"
    );
    assert!(
        !sessions.contains("hunter2") && !sessions.contains("adv-stderr"),
        "{sessions}"
    );
    // The operator sees the first line of stderr, and only that.
    assert!(logs.has_line(&["token command failed", "adv-stderr-line"]));
    assert!(!logs.text().contains("adv-second-line"));
}

#[tokio::test]
async fn token_commands_run_without_qbproxys_environment() {
    // Set in qbproxy's environment: a secret the command must not inherit,
    // and a variable the config passes on by name.
    std::env::set_var("QBPROXY_ADV_AUTH_SECRET", "must-not-leak");
    std::env::set_var("QBPROXY_ADV_PASSED", "yes");
    let mut sim_cfg = SimConfig::demo();
    sim_cfg.provider_tokens = vec![fb("fb-env-ok")];
    let sim = Sim::start(sim_cfg).await.unwrap();
    let h = setup()
        .sim(sim)
        .identity(DEMO)
        .identity(
            "name = \"fb\"\nprovider = \"facebook\"\n\
             token_command = 'test -z \"$QBPROXY_ADV_AUTH_SECRET\" && test \"$QBPROXY_ADV_PASSED\" = yes && echo fb-env-ok'\n\
             command_env = [\"QBPROXY_ADV_PASSED\"]\n",
        )
        .start()
        .await;
    h.ready().await;
    let a = h.get_as("fb", "/users.json").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["echo"]["user_id"], 2001);
}

fn with_admin_token() -> common::Setup {
    setup().set("admin", "token", "admin-token-0123456789")
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_the_probes() {
    let h = with_admin_token().start().await;
    h.ready().await;
    let client = common::client();
    let admin = |method: Method, path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        let addr = h.admin;
        async move { common::send(&client, addr, method, path, &headers, Bytes::new()).await }
    };
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            admin(Method::GET, path, vec![]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let bearer = ("Authorization", "Bearer admin-token-0123456789");
    for path in ["/metrics", "/sessions"] {
        let a = admin(Method::GET, path, vec![]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(a.headers["www-authenticate"], "Bearer");
        let a = admin(
            Method::GET,
            path,
            vec![("Authorization", "Bearer admin-token-0123456788")],
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            admin(Method::GET, path, vec![bearer]).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let a = admin(Method::POST, "/sessions/demo/renew", vec![]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.sim.creations(), 1);
    let a = admin(Method::POST, "/sessions/demo/renew", vec![bearer]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.sim.creations(), 2);
}

#[tokio::test]
async fn admin_posts_from_another_origin_are_refused() {
    let h = setup().start().await;
    h.ready().await;
    let client = common::client();
    let own = format!("http://{}", h.admin);
    let renew = |headers: Vec<(&'static str, String)>| {
        let client = client.clone();
        let addr = h.admin;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            common::send(
                &client,
                addr,
                Method::POST,
                "/sessions/demo/renew",
                &headers,
                Bytes::new(),
            )
            .await
        }
    };
    for headers in [
        vec![("Sec-Fetch-Site", "cross-site".to_owned())],
        vec![("Origin", "http://evil.example".to_owned())],
        vec![("Origin", "http://127.0.0.1:1".to_owned())],
        vec![("Origin", "null".to_owned())],
    ] {
        let a = renew(headers.clone()).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{headers:?}: {}", a.text());
    }
    assert_eq!(h.sim.creations(), 1, "no renewal happened");
    // The admin page itself, and tools that send no Origin, may.
    let a = renew(vec![
        ("Origin", own),
        ("Sec-Fetch-Site", "same-origin".to_owned()),
    ])
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(renew(vec![]).await.status, StatusCode::OK);
    assert_eq!(h.sim.creations(), 3);
}

#[tokio::test]
async fn an_unknown_identity_lists_only_what_the_client_may_use() {
    let h = setup()
        .identity(DEMO)
        .identity("name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n")
        .identity("name = \"internal-admin\"\nlogin = \"other\"\npassword = \"other-password\"\n")
        .raw_table(&format!(
            "[[client]]\nname = \"svc\"\nkey = \"{KEY}\"\nidentities = [\"other\"]\n"
        ))
        .start()
        .await;
    h.ready().await;
    let a = h
        .send(
            Method::GET,
            "/users.json",
            &[("QBProxy-Key", KEY), ("QBProxy-Identity", "nope")],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.error_message(),
        "qbproxy: unknown identity \"nope\"; valid names: other"
    );
    assert!(!a.text().contains("internal-admin") && !a.text().contains("demo"));
}

/// A page whose own name was rebound to the admin address (DNS rebinding)
/// sends that name as `Host`: the admin listener answers only its address,
/// `localhost` and `[admin] hosts`, so the page reads nothing.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_names() {
    let h = setup()
        .set("admin", "hosts", ["qbproxy-admin"])
        .start()
        .await;
    h.ready().await;
    let port = h.admin.port();
    let get = |path: &'static str, host: String| {
        let addr = h.admin;
        async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            super::raw(addr, req.as_bytes()).await
        }
    };
    for path in ["/sessions", "/metrics", "/readyz", "/healthz"] {
        for host in [
            format!("rebind.attacker.example:{port}"),
            "rebind.attacker.example".to_owned(),
            format!("127.0.0.2:{port}"),
            format!("localhost.attacker.example:{port}"),
        ] {
            let a = get(path, host.clone()).await;
            assert_eq!(a.status, 421, "{path} for {host}: {a:?}");
            assert_eq!(a.error_code(), "misdirected-host");
            assert!(
                !a.body.contains("qbproxy_") && !a.body.contains("identities"),
                "{}",
                a.body
            );
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "LocalHost".to_owned(),
            format!("qbproxy-admin:{port}"),
            "QBProxy-Admin".to_owned(),
        ] {
            let a = get(path, host.clone()).await;
            assert_eq!(a.status, 200, "{path} for {host}: {a:?}");
        }
    }
}
