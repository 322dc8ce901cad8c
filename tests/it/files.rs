//! Files through qbproxy (`proxy/files.rs`): a new file's upload URL on
//! the upstream's host names qbproxy, so the upload goes through it with
//! the identity's token; an S3 URL is left alone; uploads stream under
//! limits of their own. Each test asserts what the upstream received.

use bytes::Bytes;
use http::{Method, StatusCode};
use qbproxy_sim::{Sim, SimConfig, Uploads};
use serde_json::Value;

use crate::common::{setup, Harness};

const FORM: &[(&str, &str)] = &[("Content-Type", "application/x-www-form-urlencoded")];
const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
const OTHER: &str = "name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n";

/// Creates a file through qbproxy at `path`; returns its record.
async fn create(h: &Harness, path: &str) -> Value {
    let a = h
        .send(
            Method::POST,
            path,
            FORM,
            "blob%5Bcontent_type%5D=text%2Fplain&blob%5Bname%5D=a.txt",
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    a.json()["blob"].clone()
}

fn upload_url(blob: &Value) -> String {
    blob["blob_object_access"]["params"]
        .as_str()
        .expect("an upload URL")
        .to_owned()
}

/// A form as the SDKs send it to the upload URL: its query as fields, then
/// the file.
fn form(url: &str, file: &[u8]) -> (String, Bytes) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let mut body = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        body.extend_from_slice(
            format!("--b\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
          Content-Type: text/plain\r\n\r\n",
    );
    body.extend_from_slice(file);
    body.extend_from_slice(b"\r\n--b--\r\n");
    let path = path
        .split_once("://")
        .map_or(path, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
    (path.to_owned(), Bytes::from(body))
}

const MULTIPART: (&str, &str) = ("Content-Type", "multipart/form-data; boundary=b");

/// The upstream's record of the uploads to file `id`.
fn uploads_to(sim: &Sim, id: &Value) -> Vec<qbproxy_sim::Recorded> {
    let path = format!("/blobs/{id}/upload");
    sim.requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with(&path))
        .collect()
}

/// The SDK's flow: create the file, post it to the URL the answer names
/// (with the SDK's own `QB-Token`, as it does for a URL not on S3). The
/// URL names qbproxy, the upload arrives at the upstream once, with the
/// identity's token and not the SDK's, and the upstream has the file.
#[tokio::test]
async fn a_new_files_upload_goes_through_qbproxy_with_the_identitys_token() {
    let h = setup().start().await;
    h.ready().await;
    let blob = create(&h, "/blobs.json").await;
    let url = upload_url(&blob);
    let on_proxy = format!("http://{}/blobs/{}/upload/?", h.proxy, blob["id"]);
    assert!(url.starts_with(&on_proxy), "{url}");
    assert!(url.contains(&format!("key={}", blob["uid"].as_str().unwrap())));
    let file = vec![b'q'; 200_000];
    let (path, body) = form(&url, &file);
    let a = h
        .send(
            Method::POST,
            &path,
            &[MULTIPART, ("QB-Token", "the-sdks-own-token")],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let received = uploads_to(&h.sim, &blob["id"]);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].token, h.token(), "the identity's token");
    assert_eq!(received[0].user_id, 1001);
    let info = h.get(&format!("/blobs/{}.json", blob["id"])).await.json();
    assert_eq!(info["blob"]["uploaded_bytes"], 200_000);
    assert_eq!(info["blob"]["uploaded_by"], 1001);
}

/// `listen.public_url` names where clients reach qbproxy (behind a
/// gateway, say), and a file made through an identity's path prefix is
/// uploaded through it too, so the upload acts as the same identity.
#[tokio::test]
async fn the_upload_url_keeps_the_identity_prefix_and_names_the_public_url() {
    let h = setup()
        .identity(DEMO)
        .identity(&format!("{OTHER}path_prefix = \"/other\"\n"))
        .start()
        .await;
    h.ready().await;
    let blob = create(&h, "/other/blobs.json").await;
    let url = upload_url(&blob);
    let on_proxy = format!("http://{}/other/blobs/{}/upload/?", h.proxy, blob["id"]);
    assert!(url.starts_with(&on_proxy), "{url}");
    let (path, body) = form(&url, b"hello");
    let a = h.send(Method::POST, &path, &[MULTIPART], body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    assert_eq!(uploads_to(&h.sim, &blob["id"])[0].user_id, 1002, "other");

    let h = setup()
        .set("listen", "public_url", "https://files.example.com/qb/")
        .start()
        .await;
    h.ready().await;
    let blob = create(&h, "/blobs.json").await;
    let url = upload_url(&blob);
    let want = format!("https://files.example.com/qb/blobs/{}/upload/?", blob["id"]);
    assert!(url.starts_with(&want), "{url}");
}

/// An upload URL on another host (S3) is left as it is: the client posts
/// there itself, and qbproxy never sees the file.
#[tokio::test]
async fn an_upload_url_on_s3_is_left_alone() {
    let sim = Sim::start(SimConfig {
        uploads: Uploads::S3,
        ..SimConfig::demo()
    })
    .await
    .unwrap();
    let bucket = sim.s3_url().unwrap().to_owned();
    let h = setup().sim(sim).start().await;
    h.ready().await;
    let blob = create(&h, "/blobs.json").await;
    let url = upload_url(&blob);
    assert!(url.starts_with(&format!("{bucket}/?")), "{url}");
    // The S3 stand-in takes it without a token.
    let (_, body) = form(&url, b"hello");
    let addr = bucket.trim_start_matches("http://").parse().unwrap();
    let a = crate::common::send(
        &crate::common::client(),
        addr,
        Method::POST,
        "/",
        &[MULTIPART],
        body,
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    assert!(
        uploads_to(&h.sim, &blob["id"]).is_empty(),
        "not through qbproxy"
    );
    let info = h.get(&format!("/blobs/{}.json", blob["id"])).await.json();
    assert_eq!(info["blob"]["uploaded_bytes"], 5);
}

/// Uploads have a limit of their own: past `limits.max_body_bytes` (1 KiB
/// here) a file still goes through, streamed, up to
/// `limits.max_upload_bytes` (64 KiB); past that it gets 413 naming its
/// limit, and the upstream receives no upload at all (announced) or never
/// the whole file (streamed, chunked). Other requests keep their own
/// limit.
#[tokio::test]
async fn uploads_stream_under_a_limit_of_their_own() {
    let h = setup()
        .set("limits", "max_body_bytes", 1024)
        .set("limits", "max_upload_bytes", 64 * 1024)
        .start()
        .await;
    h.ready().await;
    let blob = create(&h, "/blobs.json").await;
    let (path, body) = form(&upload_url(&blob), &vec![b'q'; 32 * 1024]);
    let a = h.send(Method::POST, &path, &[MULTIPART], body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    assert_eq!(uploads_to(&h.sim, &blob["id"]).len(), 1);

    let blob = create(&h, "/blobs.json").await;
    let (path, body) = form(&upload_url(&blob), &vec![b'q'; 100 * 1024]);
    let a = h.send(Method::POST, &path, &[MULTIPART], body).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text());
    assert_eq!(a.headers["qbproxy-error"], "body-too-large");
    assert!(a.text().contains("65536"), "{}", a.text());
    assert!(
        uploads_to(&h.sim, &blob["id"]).is_empty(),
        "announced too large: never sent"
    );

    // Streamed (chunked, no length announced): cut off at the limit.
    let blob = create(&h, "/blobs.json").await;
    let (path, body) = form(&upload_url(&blob), &vec![b'q'; 100 * 1024]);
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        MULTIPART.1
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = crate::common::raw(h.proxy, &raw).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("65536"), "{answer}");
    assert!(
        uploads_to(&h.sim, &blob["id"])
            .iter()
            .all(|r| r.body.len() < 100 * 1024),
        "the upstream never had the whole file"
    );

    // Another request: its own limit.
    let a = h
        .send(Method::POST, "/data/Note.json", FORM, vec![b'a'; 2048])
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text());
    assert!(a.text().contains("1024"), "{}", a.text());
}
