//! What Rack (Rails' `MethodOverride`) would read as another method: every
//! class a hostile client got through, over HTTP/1.1 and HTTP/2, from a
//! client denied `DELETE /users/*`. Each request is refused, and the
//! upstream receives nothing. (`tests/it/rack_oracle.rs` asks real Rack.)

use bytes::Bytes;
use http::{Method, Request};

use super::{h2, raw, Raw, DEMO, KEY};
use crate::common::{bounded, setup, Harness, Setup};

const FORM: &str = "application/x-www-form-urlencoded";

fn keyed() -> Setup {
    setup().identity(DEMO).raw_table(&format!(
        "[[client]]\nname = \"attacker\"\nkey = \"{KEY}\"\ndeny_paths = [\"DELETE /users/*\"]\n"
    ))
}

/// A multipart body: one part with these header lines, then `delete`.
fn part(boundary: &str, headers: &str) -> String {
    format!("--{boundary}\r\n{headers}\r\n\r\ndelete\r\n--{boundary}--\r\n")
}

/// (what it is, `Content-Type`, body) for every class of the issue
/// (Content-Type `None`: none sent).
fn classes() -> Vec<(&'static str, Option<String>, String)> {
    let mut c: Vec<(&'static str, Option<String>, String)> = vec![
        ("no Content-Type", None, "_method=delete".into()),
        (
            "a space after &",
            Some(FORM.into()),
            "a=1& _method=delete".into(),
        ),
        (
            "';' as a separator",
            Some(FORM.into()),
            "a=1;_method=delete".into(),
        ),
        (
            "70 brackets before the key",
            Some(FORM.into()),
            format!("{}_method=delete", "[".repeat(70)),
        ),
        (
            "70 encoded brackets before the key",
            Some(FORM.into()),
            format!("{}_method=delete", "%5B".repeat(70)),
        ),
        (
            "an encoded key",
            Some(FORM.into()),
            "%5F%6d%65thod=delete".into(),
        ),
    ];
    let name = "Content-Disposition: form-data; name=\"_method\"";
    for (what, ct, boundary) in [
        ("boundary=\"\"", "multipart/form-data; boundary=\"\"", ""),
        ("multipart/mixed", "multipart/mixed; boundary=XyZ", "XyZ"),
        (
            "multipart/related",
            "multipart/related; boundary=XyZ",
            "XyZ",
        ),
        ("boundary= XyZ", "multipart/form-data; boundary= XyZ", "XyZ"),
        (
            "boundary=XyZ\"q",
            "multipart/form-data; boundary=XyZ\"q",
            "XyZ\"q",
        ),
    ] {
        c.push((what, Some(ct.into()), part(boundary, name)));
        // Where Rack's multipart parser reads no part, it reads the body
        // as a plain form.
        c.push((what, Some(ct.into()), "a=1&_method=delete".into()));
    }
    let ct = Some("multipart/form-data; boundary=XyZ".to_owned());
    for (what, headers) in [
        ("Content-ID alone", "Content-ID: _method"),
        (
            "\\n\\n inside the part's headers",
            "X-A: 1\n\nContent-Disposition: form-data; name=_method",
        ),
        (
            "VT before name",
            "Content-Disposition: form-data;\x0bname=_method",
        ),
        (
            "FF before name",
            "Content-Disposition: form-data;\x0cname=_method",
        ),
        (
            "CR before name",
            "Content-Disposition: form-data;\rname=_method",
        ),
        (
            "name=_method,x",
            "Content-Disposition: form-data; name=_method,x",
        ),
        (
            "name=_method\"",
            "Content-Disposition: form-data; name=_method\"",
        ),
        (
            "name=_method/x",
            "Content-Disposition: form-data; name=_method/x",
        ),
        (
            "a backslash-escaped name",
            "Content-Disposition: form-data; name=\"\\_m\\ethod\"",
        ),
        (
            "name*= percent-encoded",
            "Content-Disposition: form-data; name*=UTF-8''%5Fmethod",
        ),
    ] {
        c.push((what, ct.clone(), part("XyZ", headers)));
    }
    c
}

fn h1_post(ct: Option<&str>, extra: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /users/5.json HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\nQBProxy-Key: {KEY}\r\n"
    );
    if let Some(ct) = ct {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    for (k, v) in extra {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

fn refused(a: &Raw, what: &str, code: &str) {
    assert_eq!(a.status, 400, "{what}: {a:?}");
    assert_eq!(a.error_code(), code, "{what}");
}

fn nothing_reached_users(h: &Harness) {
    let seen: Vec<_> = h
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with("/users"))
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert!(seen.is_empty(), "the upstream received {seen:?}");
}

#[tokio::test]
async fn every_body_rack_reads_as_another_method_is_refused_over_http1() {
    let h = keyed().start().await;
    h.ready().await;
    let mut through = Vec::new();
    for (what, ct, body) in classes() {
        let a = raw(h.proxy, &h1_post(ct.as_deref(), &[], &body)).await;
        if (a.status, a.error_code()) != (400, "method-override") {
            through.push((what, a.status));
        }
    }
    assert!(through.is_empty(), "not refused: {through:?}");
    nothing_reached_users(&h);
    // The same body as JSON is data, and goes on.
    let a = raw(
        h.proxy,
        &h1_post(Some("application/json"), &[], r#"{"_method":"delete"}"#),
    )
    .await;
    assert!(a.answered_upstream(), "{a:?}");
}

#[tokio::test]
async fn every_body_rack_reads_as_another_method_is_refused_over_http2() {
    let h = keyed().start().await;
    h.ready().await;
    let (mut send, _conn) = h2(h.proxy, h2::client::Builder::new()).await;
    let mut through = Vec::new();
    for (what, ct, body) in classes() {
        let mut headers = vec![("qbproxy-key".to_owned(), KEY.to_owned())];
        if let Some(ct) = ct {
            headers.push(("content-type".into(), ct));
        }
        let (status, code) = h2_post(&mut send, &h, &headers, body).await;
        if (status, code.as_str()) != (400, "method-override") {
            through.push((what, status));
        }
    }
    assert!(through.is_empty(), "not refused: {through:?}");
    // Two Content-Type fields over HTTP/2 as well.
    let headers = [
        ("qbproxy-key".to_owned(), KEY.to_owned()),
        ("content-type".to_owned(), "application/json".to_owned()),
        ("content-type".to_owned(), FORM.to_owned()),
    ];
    let (status, code) = h2_post(&mut send, &h, &headers, "_method=delete".into()).await;
    assert_eq!((status, code.as_str()), (400, "bad-header"));
    nothing_reached_users(&h);
}

/// Sends a POST to /users/5.json with these header fields (as given, in
/// order) and body over HTTP/2; returns the status and `QBProxy-Error`.
async fn h2_post(
    send: &mut h2::client::SendRequest<Bytes>,
    h: &Harness,
    headers: &[(String, String)],
    body: String,
) -> (u16, String) {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/users/5.json", h.proxy));
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let ready = bounded("the h2 stream", send.clone().ready())
        .await
        .unwrap();
    *send = ready;
    let (resp, mut stream) = send.send_request(req.body(()).unwrap(), false).unwrap();
    stream.send_data(Bytes::from(body), true).unwrap();
    let resp = bounded("the h2 response", resp).await.unwrap();
    let code = resp
        .headers()
        .get("qbproxy-error")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status().as_u16(), code)
}

/// A `Connection` header naming `Content-Type`: once qbproxy had decided
/// "JSON, nothing to scan" it stripped `Content-Type` as hop-by-hop, and
/// Rack read the rest as a form. Headers are now made forwardable before
/// any decision, and naming an end-to-end header is refused.
#[tokio::test]
async fn a_connection_header_cannot_remove_what_the_decision_rested_on() {
    let h = keyed().start().await;
    h.ready().await;
    for named in [
        "Content-Type",
        "content-type, keep-alive",
        "QB-Token",
        "Content-Length",
    ] {
        let a = raw(
            h.proxy,
            &h1_post(
                Some("application/json"),
                &[("Connection", named)],
                "_method=delete",
            ),
        )
        .await;
        refused(&a, named, "bad-header");
        assert!(a.body.contains("Connection header names"), "{}", a.body);
    }
    nothing_reached_users(&h);
    // A connection option alone is fine.
    let a = raw(
        h.proxy,
        &h1_post(
            Some("application/json"),
            &[("Connection", "close")],
            r#"{"a":1}"#,
        ),
    )
    .await;
    assert!(a.answered_upstream(), "{a:?}");
}

/// Two `Content-Type` headers: qbproxy decided on the first while a server
/// keeping the last read a form.
#[tokio::test]
async fn two_content_types_are_refused() {
    let h = keyed().start().await;
    h.ready().await;
    let a = raw(
        h.proxy,
        &h1_post(
            Some("application/json"),
            &[("Content-Type", FORM)],
            "_method=delete",
        ),
    )
    .await;
    refused(&a, "two Content-Types", "bad-header");
    nothing_reached_users(&h);
}

/// `PATCH /users/5.json` passed a client denied `PUT /users/*`: Rails
/// routes both to `#update`, as it routes `HEAD` to `GET`'s action.
#[tokio::test]
async fn put_and_patch_rules_hold_for_each_other() {
    for (denied, tried) in [("PUT", "PATCH"), ("PATCH", "PUT")] {
        let h = setup()
            .identity(DEMO)
            .raw_table(&format!(
                "[[client]]\nname = \"attacker\"\nkey = \"{KEY}\"\ndeny_paths = [\"{denied} /users/*\"]\n"
            ))
            .start()
            .await;
        h.ready().await;
        let a = raw(
            h.proxy,
            &super::request(tried, "/users/5.json", &[("QBProxy-Key", KEY)], "{}"),
        )
        .await;
        assert_eq!(a.status, 403, "{denied} rule, {tried}: {a:?}");
        assert!(a.body.contains("deny_paths rule"), "{}", a.body);
        nothing_reached_users(&h);
    }
}
