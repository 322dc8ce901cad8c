//! One canonical view of a path for every decision: the guard, the
//! session-create exemption, identity prefixes and client rules. The
//! spellings below are examples of the classes; `random_paths_...` covers
//! the classes by generating paths.

use http::StatusCode;
use proptest::prelude::*;
use qbproxy::rules::{self as canonical, path, route_key, BadPath};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{h2, h2_send, raw, request, DEMO, KEY};
use crate::common::setup;

fn keyed(rules: &str) -> crate::common::Setup {
    setup().identity(DEMO).raw_table(&format!(
        "[[client]]\nname = \"attacker\"\nkey = \"{KEY}\"\n{rules}"
    ))
}

#[tokio::test]
async fn deny_rules_hold_for_every_spelling_of_the_path() {
    let h = keyed("deny_paths = [\"DELETE /users/*\"]\n").start().await;
    h.ready().await;
    for target in [
        "//users/5.json",
        "/./users/5.json",
        "/x/../users/5.json",
        "/%75sers/5.json",
        "/%55SERS/5.json",
        "/users/5.xml",
        "/users/5",
        "/users//5.json/",
        "/users/5%2Ejson",
        "/users/./5.json",
    ] {
        let a = raw(
            h.proxy,
            &request("DELETE", target, &[("QBProxy-Key", KEY)], ""),
        )
        .await;
        assert_eq!(a.status, 403, "DELETE {target}: {a:?}");
        assert_eq!(a.error_code(), "forbidden", "{target}");
        assert!(a.body.contains("deny_paths rule"), "{target}: {}", a.body);
    }
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    // The same over HTTP/2.
    let (mut send, _conn) = h2(h.proxy, h2::client::Builder::new()).await;
    for target in ["//users/5.json", "/x/../users/5.json", "/%75sers/5.json"] {
        let (status, headers, _) = h2_send(
            &mut send,
            h.proxy,
            "DELETE",
            target,
            &[("qbproxy-key", KEY)],
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "h2 DELETE {target}");
        assert_eq!(headers["qbproxy-error"], "forbidden");
    }
    assert!(h.sim.requests().is_empty());
    // What is allowed goes upstream in its canonical form only.
    let a = raw(
        h.proxy,
        &request(
            "GET",
            "//users/./%31001.json?x=%2F",
            &[("QBProxy-Key", KEY)],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(seen, ["/users/1001.json?x=%2F"]);
}

#[tokio::test]
async fn allow_rules_cannot_be_escaped_with_dot_segments() {
    let h = keyed("allow_paths = [\"* /chat/*\"]\n").start().await;
    h.ready().await;
    for (method, target) in [
        ("DELETE", "/chat/../users/1.json"),
        ("POST", "/chat/../login.json"),
        ("DELETE", "/chat/../session.json"),
        ("DELETE", "/chat/%2e%2e/users/1.json"),
        ("GET", "/chat/x/../../users.json"),
    ] {
        let a = raw(
            h.proxy,
            &request(method, target, &[("QBProxy-Key", KEY)], ""),
        )
        .await;
        assert_eq!(a.status, 403, "{method} {target}: {a:?}");
        assert!(a.body.contains("no allow_paths rule matches"), "{}", a.body);
    }
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    // Inside the allow-list, a dot segment is fine, and resolved.
    let a = raw(
        h.proxy,
        &request("GET", "/chat/x/../Dialog.json", &[("QBProxy-Key", KEY)], ""),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(h.sim.requests()[0].path_and_query, "/chat/Dialog.json");
}

#[tokio::test]
async fn the_guard_sees_every_spelling_of_the_session_and_login_calls() {
    let h = setup().start().await;
    h.ready().await;
    let token = h.token();
    for (method, target) in [
        ("DELETE", "/x/../session.json"),
        ("DELETE", "/./session.json"),
        ("DELETE", "/%2e/session.json"),
        ("DELETE", "//session.json"),
        ("DELETE", "/%73ession.json"),
        ("DELETE", "/Session.JSON/"),
        ("DELETE", "/session.xml"),
        ("PUT", "/session.json"),
        ("PATCH", "/session"),
        ("POST", "/Session.json"),
        ("POST", "/session.xml"),
        ("POST", "/session"),
        ("POST", "/login.json"),
        ("POST", "/a/../LOGIN"),
        ("DELETE", "/login.xml"),
        ("PUT", "/login.json"),
    ] {
        let a = raw(
            h.proxy,
            &request(
                method,
                target,
                &[("Content-Type", "application/json")],
                "{}",
            ),
        )
        .await;
        assert_eq!(a.status, 403, "{method} {target}: {a:?}");
        assert_eq!(a.error_code(), "shared-session", "{method} {target}");
    }
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    // The shared session survived every one of them.
    assert_eq!(h.token(), token);
    assert_eq!(h.get("/users.json").await.status, StatusCode::OK);
    assert_eq!(h.sim.creations(), 1);
}

#[tokio::test]
async fn paths_that_cannot_be_made_safe_get_400_bad_path() {
    let h = setup().start().await;
    h.ready().await;
    for target in [
        "/users%2F5.json",
        "/session%2fjson",
        "/users%5C5.json",
        "/../session.json",
        "/a/../../session.json",
        "/%2e%2e/users.json",
        "/users%zz",
    ] {
        let a = raw(h.proxy, &request("DELETE", target, &[], "")).await;
        assert_eq!(a.status, 400, "{target}: {a:?}");
        assert_eq!(a.error_code(), "bad-path", "{target}");
    }
    // OPTIONS * is not a path either.
    let a = raw(h.proxy, &request("OPTIONS", "*", &[], "")).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.error_code(), "bad-path");
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
}

#[tokio::test]
async fn identity_prefixes_are_matched_on_the_canonical_path() {
    let h = setup()
        .identity(DEMO)
        .identity("name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\npath_prefix = \"/other\"\n")
        .start()
        .await;
    h.ready().await;
    // A prefix reached through dot segments and doubled slashes selects it;
    // one climbed out of does not.
    let a = raw(h.proxy, &request("GET", "//other/./users.json", &[], "")).await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = raw(h.proxy, &request("GET", "/other/../users.json", &[], "")).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen: Vec<(String, u64)> = h
        .sim
        .requests()
        .iter()
        .map(|r| (r.path_and_query.clone(), r.user_id))
        .collect();
    assert_eq!(
        seen,
        [
            ("/users.json".to_owned(), 1002),
            ("/users.json".to_owned(), 1001)
        ]
    );
    // And the guard applies after the prefix is stripped, in any spelling.
    let a = raw(
        h.proxy,
        &request("DELETE", "/other//x/../session.json", &[], ""),
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(h.sim.requests().len(), 2);
}

/// What a router behind a normalising hop makes of a path: every escape
/// decoded, slashes squeezed, dot segments resolved (clamped at the root,
/// as URL resolvers do). Written apart from `canonical::path`, on purpose:
/// the model both property tests compare qbproxy's decisions with.
fn as_the_upstream_routes(p: &str) -> String {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(p).collect();
    let decoded = String::from_utf8_lossy(&bytes);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Random paths (segments, `.`, `..`, empty segments, `%2e`, `%2f`,
/// encoded letters, case variants) sent as `DELETE` with a deny rule on
/// `/users/*`: whatever qbproxy decides is what it decides for the path as
/// the upstream would route it, and what reaches the upstream routes there.
#[tokio::test]
async fn random_paths_are_decided_as_the_upstream_routes_them() {
    let h = keyed("deny_paths = [\"DELETE /users/*\"]\n").start().await;
    h.ready().await;
    let segments = [
        "",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        ".%2e",
        "%2f",
        "%2F",
        "%5c",
        "users",
        "Users",
        "%75sers",
        "%55SERS",
        "session.json",
        "%73ession.json",
        "Session.XML",
        "login.json",
        "5.json",
        "5",
        "chat",
        "x",
        "a%2Eb",
    ];
    let mut rng = StdRng::seed_from_u64(10);
    let (mut forwarded, mut denied, mut guarded, mut bad) = (0, 0, 0, 0);
    for _ in 0..400 {
        let n = rng.random_range(1..6);
        let raw_path: String = (0..n)
            .map(|_| format!("/{}", segments[rng.random_range(0..segments.len())]))
            .collect();
        let before = h.sim.requests().len();
        let a = raw(
            h.proxy,
            &request("DELETE", &raw_path, &[("QBProxy-Key", KEY)], ""),
        )
        .await;
        let lower = raw_path.to_ascii_lowercase();
        let upstream_key =
            canonical::route_key(&as_the_upstream_routes(&raw_path)).to_ascii_lowercase();
        let after = h.sim.requests();
        // Forwarded: whatever the simulator answers (it refuses what it
        // does not implement, 404 or 405), it answers with its echo.
        let status = if a.answered_upstream() { 200 } else { a.status };
        match status {
            400 => {
                assert_eq!(a.error_code(), "bad-path", "{raw_path}");
                let climbs = canonical::path(&raw_path).is_err();
                assert!(
                    lower.contains("%2f") || lower.contains("%5c") || climbs,
                    "{raw_path}"
                );
                bad += 1;
            }
            403 if a.error_code() == "forbidden" => {
                assert!(
                    upstream_key.starts_with("/users/"),
                    "{raw_path} denied, upstream key {upstream_key}"
                );
                denied += 1;
            }
            403 => {
                assert_eq!(a.error_code(), "shared-session", "{raw_path}");
                assert!(
                    upstream_key == "/session" || upstream_key == "/login",
                    "{raw_path} guarded, upstream key {upstream_key}"
                );
                guarded += 1;
            }
            200 => {
                assert!(
                    !upstream_key.starts_with("/users/"),
                    "{raw_path} reached the upstream"
                );
                assert!(
                    upstream_key != "/session" && upstream_key != "/login",
                    "{raw_path}"
                );
                let received = &after.last().expect("forwarded").path_and_query;
                // What the upstream received routes to the same place, and
                // is already canonical.
                assert_eq!(
                    canonical::route_key(&as_the_upstream_routes(received)).to_ascii_lowercase(),
                    upstream_key,
                    "{raw_path} -> {received}"
                );
                assert_eq!(canonical::path(received).unwrap(), received.as_str());
                forwarded += 1;
            }
            other => panic!("{raw_path}: {other} {a:?}"),
        }
        if status != 200 {
            assert_eq!(after.len(), before, "{raw_path} was refused yet forwarded");
        }
    }
    // The generator reached every class.
    assert!(
        forwarded > 20 && denied > 20 && guarded > 5 && bad > 20,
        "{forwarded} {denied} {guarded} {bad}"
    );
}

// The same property on the pure functions, with many more cases and
// shrinking to the smallest failing path.

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just(".%2e".to_owned()),
        Just("%2f".to_owned()),
        Just("%5C".to_owned()),
        Just("session.json".to_owned()),
        Just("Session.JSON".to_owned()),
        Just("%73ession.json".to_owned()),
        Just("%73%65ssion%2Exml".to_owned()),
        Just("login.json".to_owned()),
        Just("users".to_owned()),
        Just("%55sers".to_owned()),
        Just("%75sers".to_owned()),
        Just("5.json".to_owned()),
        Just("chat".to_owned()),
        Just("%63hat".to_owned()),
        Just("x".to_owned()),
        "[a-zA-Z0-9]{1,3}".prop_map(|s| s),
    ]
}

fn raw_path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..7).prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// The key qbproxy decides on is the key of the path as the upstream
    /// would route it; a refused path is one of the refused classes.
    #[test]
    fn decisions_match_the_upstream_view(raw in raw_path()) {
        let upstream = as_the_upstream_routes(&raw);
        match path(&raw) {
            Ok(c) => {
                prop_assert_eq!(route_key(&c), route_key(&upstream), "raw {}", raw);
                // What is forwarded routes the same at the upstream.
                prop_assert_eq!(route_key(&as_the_upstream_routes(&c)), route_key(&upstream));
                // And it is a fixed point.
                let again = path(&c).unwrap().into_owned();
                prop_assert_eq!(again.as_str(), c.as_ref());
            }
            Err(BadPath::EncodedSlash | BadPath::EncodedBackslash) => {
                let lower = raw.to_ascii_lowercase();
                prop_assert!(lower.contains("%2f") || lower.contains("%5c"), "{}", raw);
            }
            Err(BadPath::AboveRoot) => {
                // Resolving without clamping would climb above the root.
                let decoded = raw.replace("%2e", ".").replace("%2E", ".");
                let mut depth = 0i32;
                let mut climbed = false;
                for seg in decoded.split('/').filter(|s| !s.is_empty()) {
                    match seg {
                        "." => {}
                        ".." => { depth -= 1; climbed |= depth < 0; }
                        _ => depth += 1,
                    }
                }
                prop_assert!(climbed, "{}", raw);
            }
            Err(other) => prop_assert!(false, "{} refused: {:?}", raw, other),
        }
    }
}
