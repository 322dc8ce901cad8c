//! Methods, method overrides, the session-create exemption and header
//! spellings: what the upstream acts on is the method qbproxy decided on.

use tokio::io::AsyncWriteExt;

use super::{answer_of, h2, h2_send, raw, request, DEMO, KEY};
use crate::common::setup;

#[tokio::test]
async fn only_the_seven_methods_in_upper_case_are_forwarded() {
    let h = setup().start().await;
    h.ready().await;
    for method in ["delete", "Get", "TRACE", "PROPFIND", "PURGE", "LINK"] {
        let a = raw(h.proxy, &request(method, "/users/5.json", &[], "")).await;
        assert_eq!(a.status, 405, "{method}: {a:?}");
        assert_eq!(a.error_code(), "method-not-allowed");
        assert_eq!(
            a.header("allow"),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
        );
    }
    // CONNECT, in authority form.
    let a = raw(
        h.proxy,
        b"CONNECT api.quickblox.com:443 HTTP/1.1\r\nHost: api.quickblox.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 405, "{a:?}");
    // And over HTTP/2.
    let (mut send, _conn) = h2(h.proxy, h2::client::Builder::new()).await;
    let (status, _, _) = h2_send(&mut send, h.proxy, "delete", "/users/5.json", &[]).await;
    assert_eq!(status, 405);
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    // Each is forwarded; the simulator answers those it implements (and
    // refuses the others itself, 405).
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let a = raw(h.proxy, &request(method, "/data/Note.json", &[], "")).await;
        assert!(a.error_code().is_empty(), "{method}: {a:?}");
        let expected = if matches!(method, "GET" | "HEAD" | "POST") {
            200
        } else {
            405
        };
        assert_eq!(a.status, expected, "{method}: {a:?}");
    }
    let seen: Vec<String> = h
        .sim
        .requests()
        .iter()
        .map(|r| r.method.to_string())
        .collect();
    assert_eq!(
        seen,
        ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    );
}

#[tokio::test]
async fn method_override_headers_are_refused_in_any_spelling() {
    let h = setup().start().await;
    h.ready().await;
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "x_http_method_override",
        "X_HTTP_Method",
    ] {
        let a = raw(
            h.proxy,
            &request("POST", "/session.xml", &[(header, "DELETE")], ""),
        )
        .await;
        assert_eq!(a.status, 400, "{header}: {a:?}");
        assert_eq!(a.error_code(), "method-override", "{header}");
    }
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
}

#[tokio::test]
async fn method_parameters_are_refused_in_the_query_and_in_form_bodies() {
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for (target, headers, body) in [
        ("/users/5.json?_method=delete", &[][..], ""),
        ("/users/5.json?a=1&%5Fmethod=DELETE", &[][..], ""),
        ("/users/5.json", &form[..], "_method=delete"),
        ("/users/5.json", &form[..], "name=x&_METHOD=delete"),
        ("/users/5.json", &[][..], "_method=delete"),
        (
            "/users/5.json",
            &[("Content-Type", "multipart/form-data; boundary=zz")][..],
            "--zz\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\ndelete\r\n--zz--\r\n",
        ),
    ] {
        let a = raw(h.proxy, &request("POST", target, headers, body)).await;
        assert_eq!(a.status, 400, "{target} {body}: {a:?}");
        assert_eq!(a.error_code(), "method-override");
    }
    assert!(h.sim.requests().is_empty(), "{:?}", h.sim.requests());
    // JSON bodies are not forms: "_method" in one is data.
    let a = raw(
        h.proxy,
        &request(
            "POST",
            "/data/Note.json",
            &[("Content-Type", "application/json")],
            r#"{"_method":"delete"}"#,
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(h.sim.requests().len(), 1);
}

#[tokio::test]
async fn a_method_parameter_deep_in_a_streamed_form_never_reaches_the_upstream_whole() {
    // Past the replay limit the body streams; the scan goes with it and
    // cuts the request off before the chunk that holds `_method=`.
    let h = setup()
        .set("proxy", "replay_body_limit", 1024)
        .start()
        .await;
    h.ready().await;
    let filler = "a=".to_owned() + &"x".repeat(64 * 1024);
    let body = format!("{filler}&_method=delete");
    let head = format!(
        "POST /users/5.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(filler.as_bytes()).await.unwrap();
    // Over the replay limit, the body streams upstream as it comes; the
    // scan cuts it off when `_method=` arrives.
    let _ = s.write_all(b"&_method=delete").await;
    let a = answer_of(s).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.error_code(), "method-override");
    // The simulator records only requests it read whole: none.
    assert!(h.sim.requests().is_empty());
}

#[tokio::test]
async fn the_session_create_exemption_is_only_the_plain_post() {
    let h = setup().start().await;
    h.ready().await;
    // With an override it is no longer a plain POST.
    let a = raw(
        h.proxy,
        &request(
            "POST",
            "/session.json",
            &[("X-HTTP-Method-Override", "DELETE")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = raw(
        h.proxy,
        &request(
            "POST",
            "/session.json",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            "_method=delete",
        ),
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    // Other spellings of the path are guarded, not exempt (see paths.rs);
    // the canonical one passes, without qbproxy's token: the simulator
    // answers it as a session creation (422: not signed), not as a call
    // made with the shared session.
    let a = raw(
        h.proxy,
        &request(
            "POST",
            "//session.json",
            &[("Content-Type", "application/json")],
            "{}",
        ),
    )
    .await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("Unauthorized"), "{a:?}");
    assert!(h.sim.requests().is_empty());
}

#[tokio::test]
async fn headers_spelt_with_underscores_are_never_forwarded() {
    let key = KEY;
    let h = setup()
        .identity(DEMO)
        .raw_table(&format!("[[client]]\nname = \"svc\"\nkey = \"{key}\"\n"))
        .start()
        .await;
    h.ready().await;
    // A key sent as QBProxy_Key is dropped, and the client told why.
    let a = raw(
        h.proxy,
        &request("GET", "/users.json", &[("QBProxy_Key", key)], ""),
    )
    .await;
    assert_eq!(a.status, 401, "{a:?}");
    assert!(a.body.contains("write QBProxy-Key"), "{}", a.body);
    // With the key, QB_Token, QBProxy_Identity, Transfer_Encoding and
    // friends go nowhere: a server that reads '_' as '-' would otherwise see
    // a second token or framing header qbproxy never looked at.
    let a = raw(
        h.proxy,
        &request(
            "GET",
            "/users.json",
            &[
                ("QBProxy-Key", key),
                ("QB_Token", "stolen-or-garbage"),
                ("QBProxy_Identity", "other"),
                ("Transfer_Encoding", "chunked"),
                ("X_Custom", "1"),
            ],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let req = &h.sim.requests()[0];
    let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains('_')), "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with("qbproxy")), "{names:?}");
    assert_eq!(req.headers.get_all("qb-token").iter().count(), 1);
    assert_eq!(req.token, h.token());
}
