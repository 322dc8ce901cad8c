//! The simulator behaves as the real API where qbproxy depends on it.

use crate::common;

use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy::protocol::{self as signer, Params};
use qbproxy_sim::Sim;

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
    let _gate = h.sim.gate("/data/Slow");
    let mut s = tokio::net::TcpStream::connect(h.sim.addr()).await.unwrap();
    let request = format!(
        "GET /data/Slow.json HTTP/1.1\r\nHost: sim\r\nQB-Token: {}\r\n\r\n",
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

/// The echo every answer carries: what the simulator received, headers
/// included, with the token qbproxy added shown as a prefix only.
#[tokio::test]
async fn the_echo_shows_the_headers_with_the_token_as_a_prefix_and_the_body_hash() {
    let h = common::setup().start().await;
    h.ready().await;
    let body = r#"{"title":"echoed"}"#;
    let a = h
        .send(
            Method::POST,
            "/data/Note.json",
            &[("Content-Type", "application/json"), ("X-Trace", "abc-123")],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let echo = &a.json()["echo"];
    let token = h.token();
    assert_eq!(echo["headers"]["x-trace"], "abc-123");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    assert_eq!(
        echo["headers"]["qb-token"],
        qbproxy::protocol::token_prefix(&token)
    );
    assert!(!a.text().contains(&token), "the whole token never shows");
    assert_eq!(echo["body_bytes"], body.len());
    let sha = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    assert_eq!(echo["body_sha256"], hex::encode(sha));
}

/// The common endpoints in QuickBlox's shapes, as the SDKs read them,
/// through qbproxy: users, dialogs, messages, custom objects, files.
#[tokio::test]
async fn common_endpoints_answer_in_quickblox_shapes() {
    let h = common::setup().start().await;
    h.ready().await;
    let json = [("Content-Type", "application/json")];
    let form = [("Content-Type", "application/x-www-form-urlencoded")];

    let users = h.get("/users.json?page=1&per_page=1").await.json();
    assert_eq!(users["per_page"], 1);
    assert_eq!(users["total_entries"], 2);
    assert_eq!(users["items"][0]["user"]["login"], "demo");
    let user = h.get("/users/1002.json").await.json();
    assert_eq!(user["user"]["id"], 1002);
    let created = user["user"]["created_at"].as_str().unwrap();
    assert!(
        created.len() == 20 && created.ends_with('Z'),
        "QuickBlox's format: {created}"
    );
    let missing = h.get("/users/5.json").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["errors"]["base"].is_array());

    // A form, as the JS SDK sends it.
    let dialog = h
        .send(
            Method::POST,
            "/chat/Dialog.json",
            &form,
            "name=team&occupants_ids%5B%5D=1002&type=2",
        )
        .await
        .json();
    let id = dialog["_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24, "{dialog}");
    assert_eq!(dialog["occupants_ids"], serde_json::json!([1001, 1002]));
    assert_eq!(dialog["user_id"], 1001);
    assert!(dialog["xmpp_room_jid"]
        .as_str()
        .unwrap()
        .ends_with("@muc.chat.quickblox.com"));
    let listed = h.get("/chat/Dialog.json").await.json();
    assert_eq!(listed["items"][0]["_id"], id.as_str());

    let message = h
        .send(
            Method::POST,
            "/chat/Message.json",
            &json,
            format!(r#"{{"chat_dialog_id":"{id}","message":"hi"}}"#),
        )
        .await
        .json();
    assert_eq!(message["chat_dialog_id"], id.as_str());
    assert_eq!(message["sender_id"], 1001);
    let listed = h.get("/chat/Dialog.json").await.json();
    assert_eq!(listed["items"][0]["last_message"], "hi");
    let messages = h
        .get(&format!("/chat/Message.json?chat_dialog_id={id}"))
        .await
        .json();
    assert_eq!(messages["items"][0]["message"], "hi");

    let note = h
        .send(Method::POST, "/data/Note.json", &json, r#"{"title":"t"}"#)
        .await
        .json();
    assert_eq!(note["title"], "t");
    assert_eq!(note["user_id"], 1001);
    assert!(note["_id"].is_string() && note["created_at"].is_u64());
    let notes = h.get("/data/Note.json").await.json();
    assert_eq!(notes["class_name"], "Note");
    assert_eq!(notes["items"][0]["_id"], note["_id"]);

    // A file: the record, the upload to the URL it names (on the API's
    // host, so through qbproxy, which named itself), completion, then its
    // info.
    let created = h
        .send(
            Method::POST,
            "/blobs.json",
            &form,
            "blob%5Bcontent_type%5D=text%2Fplain&blob%5Bname%5D=a.txt",
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let blob = created.json()["blob"].clone();
    let upload = blob["blob_object_access"]["params"]
        .as_str()
        .unwrap()
        .to_owned();
    let on_proxy = format!("http://{}/blobs/{}/upload/?", h.proxy, blob["id"]);
    assert!(upload.starts_with(&on_proxy), "{upload}");
    let key = blob["uid"].as_str().unwrap();
    let multipart = format!(
        "--b\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\n{key}\r\n\
         --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nhello\r\n--b--\r\n"
    );
    let uploaded = h
        .send(
            Method::POST,
            &format!("/blobs/{}/upload/", blob["id"]),
            &[("Content-Type", "multipart/form-data; boundary=b")],
            multipart,
        )
        .await;
    assert_eq!(uploaded.status, StatusCode::CREATED, "{}", uploaded.text());
    let path = format!("/blobs/{}/complete.json", blob["id"]);
    let done = h.send(Method::PUT, &path, &form, "size=5").await;
    assert_eq!(done.status, StatusCode::OK);
    assert!(
        done.body.is_empty(),
        "QuickBlox answers completion with no body"
    );
    let info = h.get(&format!("/blobs/{}.json", blob["id"])).await.json();
    assert_eq!(info["blob"]["size"], 5);
    assert_eq!(info["blob"]["blob_status"], "complete");
}

#[tokio::test]
async fn api_keys_are_accepted_with_the_user_they_act_as() {
    let sim = common::demo_sim().await;
    let client = common::client();
    let call = |headers: Vec<(&'static str, &'static str)>, path: &'static str| {
        let client = client.clone();
        let addr = sim.addr();
        async move { common::send(&client, addr, Method::GET, path, &headers, Bytes::new()).await }
    };
    let a = call(
        vec![("Authorization", "ApiKey demo-api-key")],
        "/users.json",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["echo"]["user_id"], 0, "the application");
    assert_eq!(
        a.json()["echo"]["headers"]["authorization"],
        "ApiKey demo-a…",
        "the key shown as a prefix"
    );
    let a = call(
        vec![
            ("Authorization", "apikey demo-api-key"),
            ("On-Behalf-Of", "1002"),
        ],
        "/users.json",
    )
    .await;
    assert_eq!(a.json()["echo"]["user_id"], 1002);
    let a = call(vec![("Authorization", "ApiKey wrong")], "/users.json").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(
        vec![
            ("Authorization", "ApiKey demo-api-key"),
            ("On-Behalf-Of", "99"),
        ],
        "/users.json",
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let a = call(
        vec![("Authorization", "ApiKey demo-api-key")],
        "/session.json",
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "no session");
    assert_eq!(sim.attempts(), 0);
    assert_eq!(sim.requests().len(), 2, "the two accepted calls");
}

/// The simulator refuses what it does not implement, in QuickBlox's
/// error shape, and counts it: an unknown path 404, a known path with
/// another method 405 (with `Allow`), a filter operator it does not know
/// 422. Never 200 to something it did not do.
#[tokio::test]
async fn what_the_simulator_does_not_implement_is_refused_and_counted() {
    let h = common::setup().start().await;
    h.ready().await;
    let unknown = h.get("/nonexistent/thing.json").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.json()["errors"]["base"][0]
        .as_str()
        .unwrap()
        .contains("no endpoint /nonexistent/thing.json"));
    let other_method = h.send(Method::PUT, "/data/Note.json", &[], "").await;
    assert_eq!(other_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(other_method.headers["allow"], "GET, HEAD, POST");
    let operator = h.get("/data/Note.json?rank[ctn]=3").await;
    assert_eq!(operator.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        operator.text().contains("\\\"ctn\\\""),
        "{}",
        operator.text()
    );
    // A user field it does not change.
    let login = h
        .send(
            Method::PUT,
            "/users/1001.json",
            &[("Content-Type", "application/json")],
            r#"{"user":{"login":"renamed"}}"#,
        )
        .await;
    assert_eq!(login.status, StatusCode::UNPROCESSABLE_ENTITY);

    assert_eq!(h.sim.unimplemented(), 4);
    let stats = h.sim.stats();
    assert_eq!(stats["unimplemented"], 4);
    assert_eq!(
        stats["unimplemented_calls"][0],
        "GET /nonexistent/thing.json"
    );
    assert_eq!(stats["unimplemented_calls"][1], "PUT /data/Note.json");
}

/// Users change their own profile and password, and delete themselves;
/// the change holds (later reads, logins), and nobody changes another.
#[tokio::test]
async fn users_update_and_delete_themselves_with_state() {
    let h = common::setup().start().await;
    h.ready().await;
    let json = [("Content-Type", "application/json")];
    let put = |path: &'static str, body: &'static str| h.send(Method::PUT, path, &json, body);

    let updated = put(
        "/users/1001.json",
        r#"{"user":{"full_name":"Demo User","custom_data":"x"}}"#,
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text());
    assert_eq!(updated.json()["user"]["full_name"], "Demo User");
    let read = h.get("/users/1001.json").await.json();
    assert_eq!(read["user"]["full_name"], "Demo User");
    assert_eq!(read["user"]["custom_data"], "x");
    // Someone else's profile: 403.
    let other = put("/users/1002.json", r#"{"user":{"full_name":"no"}}"#).await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    // A password changes only with the old one.
    let wrong = put(
        "/users/1001.json",
        r#"{"user":{"password":"new-pw","old_password":"nope"}}"#,
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNPROCESSABLE_ENTITY);
    let changed = put(
        "/users/1001.json",
        r#"{"user":{"password":"new-pw","old_password":"demo-password"}}"#,
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    let secret = h.sim.config().auth_secret.clone();
    let login = |pw: &str| {
        let p = params(&h.sim, now(), &format!("pw-{pw}"))
            .str("user[login]", "demo")
            .str("user[password]", pw);
        let signed = p.clone().str("signature", signer::sign(&secret, &p));
        create(&h.sim, signed.to_json().to_string(), "application/json")
    };
    assert_eq!(
        login("demo-password").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(login("new-pw").await.status, StatusCode::CREATED);

    // Deleting someone else: 403; oneself: gone, and no more logins.
    let other = h.send(Method::DELETE, "/users/1002.json", &[], "").await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    let deleted = h.send(Method::DELETE, "/users/1001.json", &[], "").await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(
        h.get("/users/1001.json").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.get("/users.json").await.json()["total_entries"], 1);
    assert_eq!(login("new-pw").await.status, StatusCode::UNAUTHORIZED);
}

/// Custom objects: the filter operators, sort, skip, limit and count, and
/// updates and deletes that hold.
#[tokio::test]
async fn custom_objects_filter_sort_page_count_update_and_delete() {
    let h = common::setup().start().await;
    h.ready().await;
    let json = [("Content-Type", "application/json")];
    let mut ids = Vec::new();
    for (rank, name) in [(3, "c"), (1, "a"), (5, "e"), (2, "b"), (4, "d")] {
        let body = format!(r#"{{"rank":{rank},"name":"{name}"}}"#);
        let created = h.send(Method::POST, "/data/Note.json", &json, body).await;
        assert_eq!(created.status, StatusCode::OK);
        ids.push(created.json()["_id"].as_str().unwrap().to_owned());
    }
    let h = &h;
    let ranks = |query: &'static str| async move {
        let answer = h.get(&format!("/data/Note.json?{query}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{query}: {}", answer.text());
        answer.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["rank"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ranks("rank[gt]=3").await, [5, 4]);
    assert_eq!(ranks("rank[gte]=3&sort_asc=rank").await, [3, 4, 5]);
    assert_eq!(ranks("rank[lt]=3&sort_asc=rank").await, [1, 2]);
    assert_eq!(ranks("rank[lte]=2&sort_desc=rank").await, [2, 1]);
    assert_eq!(ranks("rank[ne]=3&sort_asc=rank").await, [1, 2, 4, 5]);
    assert_eq!(ranks("rank[in]=1,5&sort_asc=rank").await, [1, 5]);
    assert_eq!(ranks("rank[nin]=1,5&sort_asc=rank").await, [2, 3, 4]);
    assert_eq!(ranks("name=d").await, [4]);
    assert_eq!(ranks("sort_desc=rank&skip=1&limit=2").await, [4, 3]);
    let count = h.get("/data/Note.json?count=1&rank[gt]=1").await.json();
    assert_eq!(count["items_count"], 4);

    // Update: the record comes back changed, and stays so.
    let path = format!("/data/Note/{}.json", ids[0]);
    let updated = h.send(Method::PUT, &path, &json, r#"{"rank":30}"#).await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.json()["rank"], 30);
    assert_eq!(h.get(&path).await.json()["items"][0]["rank"], 30);

    // Delete one, then two at once (one of them already gone).
    let deleted = h.send(Method::DELETE, &path, &[], "").await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(h.get(&path).await.json()["items"], serde_json::json!([]));
    let both = format!("/data/Note/{},{}.json", ids[0], ids[1]);
    let summary = h.send(Method::DELETE, &both, &[], "").await.json();
    assert_eq!(
        summary["SuccessfullyDeleted"]["ids"],
        serde_json::json!([ids[1]])
    );
    assert_eq!(summary["NotFound"]["ids"], serde_json::json!([ids[0]]));
    assert_eq!(ranks("sort_asc=rank").await, [2, 4, 5]);
}

/// Dialogs and messages: list with filters, update and delete, with state.
#[tokio::test]
async fn dialogs_and_messages_update_and_delete_with_state() {
    let h = common::setup().start().await;
    h.ready().await;
    let json = [("Content-Type", "application/json")];
    let dialog = h
        .send(
            Method::POST,
            "/chat/Dialog.json",
            &json,
            r#"{"type":2,"name":"team","occupants_ids":[1002]}"#,
        )
        .await
        .json();
    let dialog_id = dialog["_id"].as_str().unwrap().to_owned();
    let mut messages = Vec::new();
    for text in ["one", "two", "three"] {
        let body = format!(r#"{{"chat_dialog_id":"{dialog_id}","message":"{text}"}}"#);
        let m = h
            .send(Method::POST, "/chat/Message.json", &json, body)
            .await
            .json();
        messages.push(m["_id"].as_str().unwrap().to_owned());
    }
    let (h, dialog_id) = (&h, &dialog_id);
    let texts = |query: String| async move {
        let answer = h
            .get(&format!(
                "/chat/Message.json?chat_dialog_id={dialog_id}&{query}"
            ))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        answer.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts("limit=2".into()).await, ["one", "two"]);
    assert_eq!(
        texts("message[ne]=two&sort_desc=message".into()).await,
        ["three", "one"]
    );
    // Without its dialog: 422, as QuickBlox.
    assert_eq!(
        h.get("/chat/Message.json").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let path = format!("/chat/Message/{}.json", messages[0]);
    let edited = h
        .send(Method::PUT, &path, &json, r#"{"message":"uno"}"#)
        .await;
    assert_eq!(edited.status, StatusCode::OK);
    assert_eq!(texts(String::new()).await, ["uno", "two", "three"]);
    let gone = h.send(Method::DELETE, &path, &[], "").await;
    assert_eq!(gone.status, StatusCode::OK);
    assert_eq!(texts(String::new()).await, ["two", "three"]);
    assert_eq!(
        h.send(Method::DELETE, &path, &[], "").await.status,
        StatusCode::NOT_FOUND
    );

    let path = format!("/chat/Dialog/{dialog_id}.json");
    let renamed = h
        .send(Method::PUT, &path, &json, r#"{"name":"renamed"}"#)
        .await;
    assert_eq!(renamed.json()["name"], "renamed");
    assert_eq!(
        h.get("/chat/Dialog.json").await.json()["items"][0]["name"],
        "renamed"
    );
    assert_eq!(
        h.send(Method::DELETE, &path, &[], "").await.status,
        StatusCode::OK
    );
    assert_eq!(h.get("/chat/Dialog.json").await.json()["total_entries"], 0);
}

/// The simulator's chat (XMPP over WebSocket): SASL PLAIN with a live
/// session token (or the user's password), never with a dead or another
/// user's token ("Password not verified"); bind, session, presence; a
/// one-to-one message routed between two connected users; a ping; an IQ
/// it does not implement refused and counted.
#[tokio::test]
async fn chat_logs_in_with_a_session_token_and_routes_messages() {
    use crate::common::xmpp::Xmpp;
    let h = common::setup().start().await;
    h.ready().await;
    let chat = h.sim.chat_url();
    let token = h.token();
    let (mut demo, demo_jid) = Xmpp::login(&chat, "chat.example", "1001-76730", &token, "a")
        .await
        .expect("a token logs in");
    assert_eq!(demo_jid, "1001-76730@chat.example/a");
    let (mut other, other_jid) =
        Xmpp::login(&chat, "chat.example", "1002-76730", "other-password", "b")
            .await
            .expect("a password logs in");
    assert_eq!(h.sim.chat_online(1001), 1);

    demo.send(r#"<message to="1002-76730@chat.example" type="chat" id="m1"><body>hi &amp; bye</body></message>"#)
        .await;
    let got = other.recv().await.unwrap();
    assert!(got.contains(&format!(r#"from="{demo_jid}""#)), "{got}");
    assert!(got.contains("<body>hi &amp; bye</body>"), "{got}");
    let sent = h.sim.chat_messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].from, sent[0].to, sent[0].delivered),
        (1001, 1002, true)
    );
    assert_eq!(sent[0].body, "hi & bye");

    other
        .send(r#"<iq type="get" id="p1" xmlns="jabber:client"><ping xmlns="urn:xmpp:ping"/></iq>"#)
        .await;
    let pong = other.recv().await.unwrap();
    assert!(
        pong.contains(r#"type="result""#) && pong.contains(r#"id="p1""#),
        "{pong}"
    );
    other
        .send(r#"<iq type="get" id="v1" xmlns="jabber:client"><vCard xmlns="vcard-temp"/></iq>"#)
        .await;
    let refused = other.recv().await.unwrap();
    assert!(refused.contains("feature-not-implemented"), "{refused}");
    assert_eq!(h.sim.chat_unimplemented(), 1);
    let _ = other_jid;

    // Someone else's token, then a dead one: refused as QuickBlox does.
    let wrong = Xmpp::login(&chat, "chat.example", "1002-76730", &token, "c").await;
    assert!(wrong.err().unwrap().contains("Password not verified"));
    h.sim.expire_all();
    let dead = Xmpp::login(&chat, "chat.example", "1001-76730", &token, "d").await;
    assert!(dead.err().unwrap().contains("not-authorized"));
    let logins: Vec<_> = h
        .sim
        .chat_logins()
        .iter()
        .map(|l| (l.user_id, l.with))
        .collect();
    use qbproxy_sim::Credential::*;
    assert_eq!(
        logins,
        [
            (1001, Token),
            (1002, Password),
            (1002, Refused),
            (1001, Refused)
        ]
    );
    demo.send(r#"<close xmlns="urn:ietf:params:xml:ns:xmpp-framing"/>"#)
        .await;
    assert!(demo.recv().await.unwrap().starts_with("<close"));
    assert_eq!(demo.recv().await, None, "closed");
}
