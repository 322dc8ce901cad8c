//! Chat through qbproxy (`chat/`): XMPP over WebSocket, logged in on the
//! chat server (the simulator's) with the session qbproxy holds. Each test
//! asserts what the chat server saw (`Sim::chat_logins`, messages routed),
//! not only what the client was told.

use qbproxy_sim::Credential::{Password, Refused, Token};
use qbproxy_sim::Sim;

use crate::common::xmpp::{is_result, Xmpp, XmppTcp, FRAMING, SASL};
use crate::common::{demo_sim, setup, Harness, Setup};

const DEMO: &str = "name = \"demo\"\nlogin = \"demo\"\npassword = \"demo-password\"\n";
const OTHER: &str = "name = \"other\"\nlogin = \"other\"\npassword = \"other-password\"\n";
const DOMAIN: &str = "chat.example";
/// A password the chat server would refuse: qbproxy never sends it.
const PLACEHOLDER: &str = "any-placeholder";

fn with_chat(sim: &Sim, extra: &str) -> Setup {
    setup().sim(sim.clone()).raw_table(&format!(
        "[chat]\nwebsocket_addr = \"127.0.0.1:0\"\nupstream = \"{}\"\n{extra}",
        sim.chat_url()
    ))
}

fn chat_url(h: &Harness) -> String {
    format!("ws://{}", h.handle.chat_addr().expect("a chat listener"))
}

async fn both(extra: &str) -> Harness {
    let sim = demo_sim().await;
    let h = with_chat(&sim, extra)
        .identity(DEMO)
        .identity(OTHER)
        .start()
        .await;
    h.ready().await;
    // Each identity's session, made (with a key, if keys are configured).
    let a = h
        .send(
            http::Method::GET,
            "/users.json",
            &[
                ("QBProxy-Identity", "other"),
                ("QBProxy-Key", "app-key-0123456789abcdef"),
            ],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    h
}

fn logins(sim: &Sim) -> Vec<(u64, qbproxy_sim::Credential)> {
    sim.chat_logins()
        .iter()
        .map(|l| (l.user_id, l.with))
        .collect()
}

/// Two SDK users log in to chat through qbproxy with a placeholder
/// password; the chat server sees each log in with its live session token
/// (it would refuse the placeholder), the client never sees the token,
/// and a message from one reaches the other through qbproxy.
#[tokio::test]
async fn two_users_chat_through_qbproxy_with_the_sessions_it_holds() {
    let h = both("").await;
    let url = chat_url(&h);
    // The login, by hand: everything the client is sent before it binds.
    let mut seen = Vec::new();
    let mut demo = Xmpp::connect(&url).await;
    let (open, features) = demo.open(DOMAIN).await;
    assert!(open.contains(&format!(r#"from="{DOMAIN}""#)), "{open}");
    assert!(
        features.contains("<mechanism>PLAIN</mechanism>"),
        "{features}"
    );
    // Each WebSocket message stands alone: its prefix is declared in it
    // (a browser's DOMParser finds no mechanisms otherwise).
    let declared = "<stream:features xmlns:stream=\"http://etherx.jabber.org/streams\"";
    assert!(features.starts_with(declared), "{features}");
    let success = demo.auth("1001-76730", PLACEHOLDER).await;
    assert!(success.starts_with("<success"), "{success}");
    seen.extend([open, features, success]);
    let (open, features) = demo.open(DOMAIN).await;
    assert!(features.contains("bind"), "{features}");
    seen.extend([open, features]);
    assert_eq!(logins(&h.sim), [(1001, Token)]);
    let token = h.token();
    assert!(
        seen.iter().all(|m| !m.contains(&token)),
        "the token never reaches the client"
    );
    demo.send(r#"<iq type="set" id="b1" xmlns="jabber:client"><bind xmlns="urn:ietf:params:xml:ns:xmpp-bind"><resource>web</resource></bind></iq>"#)
        .await;
    let bound = demo.recv().await.unwrap();
    assert!(
        bound.contains("<jid>1001-76730@chat.example/web</jid>"),
        "{bound}"
    );

    let (mut other, _) = Xmpp::login(&url, DOMAIN, "1002-76730", PLACEHOLDER, "phone")
        .await
        .expect("other logs in");
    assert_eq!(logins(&h.sim), [(1001, Token), (1002, Token)]);
    demo.send(r#"<message to="1002-76730@chat.example" type="chat" id="m1" xmlns="jabber:client"><body>through qbproxy</body></message>"#)
        .await;
    let got = other.recv().await.unwrap();
    assert!(got.contains("<body>through qbproxy</body>"), "{got}");
    assert!(
        got.contains(r#"from="1001-76730@chat.example/web""#),
        "{got}"
    );
    let routed = h.sim.chat_messages();
    assert_eq!(
        (routed[0].from, routed[0].to, routed[0].delivered),
        (1001, 1002, true)
    );

    assert_eq!(
        h.metric("qbproxy_chat_connections{transport=\"websocket\"}"),
        2
    );
    assert_eq!(
        h.metric("qbproxy_chat_logins_total{identity=\"demo\",pool=\"\",outcome=\"ok\"}"),
        1
    );
    assert!(h.metric("qbproxy_chat_stanzas_total{direction=\"in\"}") >= 2);
    demo.send(&format!(r#"<close xmlns="{FRAMING}"/>"#)).await;
    assert!(demo.recv().await.unwrap().starts_with("<close"));
}

/// The session died at the chat server (two idle hours): its login with
/// the held token is refused, qbproxy renews the session once (one
/// creation) and logs in with the new token; the client sees a success.
#[tokio::test]
async fn a_token_refused_at_chat_login_is_renewed_once() {
    let h = both("").await;
    let before = h.sim.creations_for(1001);
    h.sim.expire_all();
    let (_demo, jid) = Xmpp::login(&chat_url(&h), DOMAIN, "1001-76730", PLACEHOLDER, "a")
        .await
        .expect("logged in after one renewal");
    assert_eq!(jid, "1001-76730@chat.example/a");
    assert_eq!(logins(&h.sim), [(1001, Refused), (1001, Token)]);
    assert_eq!(h.sim.creations_for(1001), before + 1, "one renewal");
    assert_eq!(
        h.metric("qbproxy_chat_logins_total{identity=\"demo\",pool=\"\",outcome=\"renewed\"}"),
        1
    );
    // REST goes on with the renewed session, with no second renewal.
    assert_eq!(h.get("/users.json").await.status, 200);
    assert_eq!(h.sim.creations_for(1001), before + 1);
}

/// A user qbproxy holds no session for is refused by default, without a
/// word to the chat server; with `unknown_users = "pass"` the client's own
/// credentials go to the chat server, which decides.
#[tokio::test]
async fn a_user_qbproxy_does_not_hold_is_refused_or_passed() {
    let sim = demo_sim().await;
    let h = with_chat(&sim, "").identity(DEMO).start().await;
    h.ready().await;
    let refused = Xmpp::login(&chat_url(&h), DOMAIN, "1002-76730", "other-password", "a").await;
    let refused = refused.err().expect("refused");
    assert!(refused.contains("not-authorized"), "{refused}");
    assert!(
        refused.contains("qbproxy holds no session for user 1002"),
        "{refused}"
    );
    assert!(logins(&sim).is_empty(), "the chat server saw nothing");

    let sim = demo_sim().await;
    let h = with_chat(&sim, "unknown_users = \"pass\"\n")
        .identity(DEMO)
        .start()
        .await;
    h.ready().await;
    let url = chat_url(&h);
    Xmpp::login(&url, DOMAIN, "1002-76730", "other-password", "a")
        .await
        .expect("its own password, passed on");
    let wrong = Xmpp::login(&url, DOMAIN, "1002-76730", "not-it", "b").await;
    assert!(wrong.err().unwrap().contains("Password not verified"));
    assert_eq!(logins(&sim), [(1002, Password), (1002, Refused)]);
}

/// With `[[client]]` keys, the SASL password must be a client's key (a
/// browser's WebSocket cannot send headers), and its rules hold: a client
/// limited to the identity "other" cannot chat as demo's user.
#[tokio::test]
async fn client_keys_and_their_rules_hold_for_chat() {
    let clients = "[[client]]\nname = \"app\"\nkey = \"app-key-0123456789abcdef\"\n\
                   [[client]]\nname = \"narrow\"\nkey = \"narrow-key-0123456789abcd\"\nidentities = [\"other\"]\n";
    let h = both(clients).await;
    let url = chat_url(&h);
    let no_key = Xmpp::login(&url, DOMAIN, "1001-76730", PLACEHOLDER, "a").await;
    assert!(no_key.err().unwrap().contains("not-authorized"));
    let narrow = Xmpp::login(&url, DOMAIN, "1001-76730", "narrow-key-0123456789abcd", "a").await;
    let narrow = narrow.err().unwrap();
    assert!(narrow.contains("narrow"), "{narrow}");
    assert!(logins(&h.sim).is_empty(), "the chat server saw nothing");
    Xmpp::login(&url, DOMAIN, "1002-76730", "narrow-key-0123456789abcd", "a")
        .await
        .expect("its own identity");
    Xmpp::login(&url, DOMAIN, "1001-76730", "app-key-0123456789abcdef", "a")
        .await
        .expect("any identity");
    assert_eq!(logins(&h.sim), [(1002, Token), (1001, Token)]);
}

/// An element over `chat.max_stanza_bytes` ends that connection; another
/// connection is served on.
#[tokio::test]
async fn an_element_over_the_limit_ends_only_its_connection() {
    let h = both("max_stanza_bytes = 4096\n").await;
    let url = chat_url(&h);
    let (mut big, _) = Xmpp::login(&url, DOMAIN, "1001-76730", PLACEHOLDER, "a")
        .await
        .unwrap();
    let (mut other, _) = Xmpp::login(&url, DOMAIN, "1002-76730", PLACEHOLDER, "b")
        .await
        .unwrap();
    let body = "x".repeat(8192);
    big.send(&format!(
        r#"<message to="1002-76730@chat.example" type="chat"><body>{body}</body></message>"#
    ))
    .await;
    let error = big.recv().await.unwrap();
    assert!(error.contains("policy-violation"), "{error}");
    assert!(big.recv().await.unwrap().starts_with("<close"));
    assert_eq!(big.recv().await, None, "closed");
    assert!(h.sim.chat_messages().is_empty(), "never relayed");
    other
        .send(r#"<iq type="get" id="p" xmlns="jabber:client"><ping xmlns="urn:xmpp:ping"/></iq>"#)
        .await;
    assert!(other.recv().await.unwrap().contains(r#"id="p""#));
    let _ = SASL;
}

/// XMPP over TCP (as Node's, iOS's and Android's SDKs speak it): one XML
/// stream, stanzas without their namespace; through qbproxy a TCP client
/// and a WebSocket client chat with each other, and the TCP stream closes
/// as XMPP closes it.
#[tokio::test]
async fn a_client_over_tcp_chats_with_one_over_websocket() {
    let h = both("tcp_addr = \"127.0.0.1:0\"\n").await;
    let tcp_addr = h.handle.chat_tcp_addr().expect("a TCP chat listener");
    let mut node = XmppTcp::login(tcp_addr, "1001-76730", PLACEHOLDER, "node", None).await;
    let (mut web, _) = Xmpp::login(&chat_url(&h), DOMAIN, "1002-76730", PLACEHOLDER, "web")
        .await
        .unwrap();
    assert_eq!(logins(&h.sim), [(1001, Token), (1002, Token)]);
    assert_eq!(h.metric("qbproxy_chat_connections{transport=\"tcp\"}"), 1);

    node.send("<message to='1002-76730@chat.example' type='chat' id='t1'><body>from node</body></message>")
        .await;
    let got = web.recv().await.unwrap();
    assert!(got.contains("<body>from node</body>"), "{got}");
    assert!(
        got.contains("from=\"1001-76730@chat.example/node\""),
        "{got}"
    );
    web.send(r#"<message to="1001-76730@chat.example" type="chat" xmlns="jabber:client"><body>from the web</body></message>"#)
        .await;
    let got = node.expect("</message>").await;
    assert!(got.contains("<body>from the web</body>"), "{got}");
    assert_eq!(h.sim.chat_messages().len(), 2);

    node.send("</stream:stream>").await;
    node.expect("</stream:stream>").await;
}

/// Over TCP with a certificate (`[listen] tls_cert`), STARTTLS is required
/// before the login: a client that skips it is refused and the chat
/// server sees nothing; one that starts TLS logs in.
#[tokio::test]
async fn over_tcp_starttls_comes_first() {
    use crate::common::certs::{Ca, Dir};
    let dir = Dir::new("chat-tls");
    let ca = Ca::new("chat CA");
    let cert = ca.ecdsa_leaf();
    let sim = demo_sim().await;
    let h = with_chat(&sim, "tcp_addr = \"127.0.0.1:0\"\n")
        .set("listen", "tls_cert", dir.write("server.crt", &cert.0))
        .set("listen", "tls_key", dir.write("server.key", &cert.1))
        .start()
        .await;
    h.ready().await;
    let addr = h.handle.chat_tcp_addr().unwrap();
    let mut skips = XmppTcp::connect(addr).await;
    skips.send(crate::common::xmpp::HEADER).await;
    skips.expect("<required/>").await;
    let plain = "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AHgAeQ==</auth>";
    skips.send(plain).await;
    skips.expect("policy-violation").await;
    skips.expect("</stream:stream>").await;
    assert!(logins(&sim).is_empty());

    XmppTcp::login(addr, "1001-76730", PLACEHOLDER, "secure", Some(ca.der())).await;
    assert_eq!(logins(&sim), [(1001, Token)]);
}

/// Prosody (Debian's), a real XMPP server, as the chat server: the
/// account's password is the session token qbproxy holds, as QuickBlox
/// checks it. Offered SCRAM-SHA-1 only, then PLAIN too, qbproxy logs in
/// with the token; the client binds and pings through qbproxy, Prosody
/// answering. A token Prosody refuses is renewed once, and when the new
/// one is refused as well the client is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_xmpp_server_takes_the_login_with_scram_or_plain() {
    use crate::common::prosody::Prosody;
    for scram_only in [true, false] {
        let prosody = Prosody::start(scram_only).await;
        let sim = demo_sim().await;
        let h = setup()
            .sim(sim.clone())
            .raw_table(&format!(
                "[chat]\nwebsocket_addr = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
                prosody.ws_url()
            ))
            .identity(DEMO)
            .start()
            .await;
        h.ready().await;
        prosody.register("1001-76730", &h.token()).await;
        let url = chat_url(&h);
        let (mut c, jid) = Xmpp::login(&url, "localhost", "1001-76730", PLACEHOLDER, "a")
            .await
            .unwrap_or_else(|e| panic!("scram_only={scram_only}: {e}\n{}", prosody.log()));
        assert_eq!(jid, "1001-76730@localhost/a");
        c.send(r#"<iq type="get" id="p1" to="localhost" xmlns="jabber:client"><ping xmlns="urn:xmpp:ping"/></iq>"#)
            .await;
        // Prosody sends our own presence back first: skip to the answer.
        let pong = loop {
            let m = c.recv().await.expect("the ping's answer");
            if m.contains("p1") {
                break m;
            }
        };
        assert!(is_result(&pong), "{pong}");
        // Prosody's own word (with PLAIN disabled, SCRAM-SHA-1 it was).
        assert!(
            prosody
                .log()
                .contains("Authenticated as 1001-76730@localhost"),
            "scram_only={scram_only}: {}",
            prosody.log()
        );

        // The account keeps a password that is no session's: refused,
        // one renewal, refused again, and the client is told.
        prosody.register("1001-76730", "not-a-token").await;
        let before = sim.creations_for(1001);
        let refused = Xmpp::login(&url, "localhost", "1001-76730", PLACEHOLDER, "b").await;
        assert!(refused.err().unwrap().contains("not-authorized"));
        assert_eq!(sim.creations_for(1001), before + 1, "one renewal");
        assert_eq!(
            h.metric("qbproxy_chat_logins_total{identity=\"demo\",pool=\"\",outcome=\"refused\"}"),
            1
        );
        prosody.stop().await;
    }
}

/// One access line per chat connection when it ends: transport, client,
/// identity, user, elements each way and why it ended; a refused login
/// gets its line too. No token in any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chat_connection_ends_in_one_access_line() {
    let logs = crate::common::capture_logs();
    // The log is the whole test binary's: this test's lines are the ones
    // naming its client.
    let h =
        both("[[client]]\nname = \"access-line-test\"\nkey = \"app-key-0123456789abcdef\"\n").await;
    let url = chat_url(&h);
    let key = "app-key-0123456789abcdef";
    let peer_line = |fragments: Vec<String>| {
        let logs = logs.clone();
        async move {
            crate::common::bounded("the chat access line", async {
                loop {
                    let found: Vec<String> = logs
                        .text()
                        .lines()
                        .filter(|l| {
                            l.contains("qbproxy::access")
                                && l.contains("kind=\"chat\"")
                                && fragments.iter().all(|f| l.contains(f.as_str()))
                        })
                        .map(str::to_owned)
                        .collect();
                    if !found.is_empty() {
                        return found;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
        }
    };
    let (mut demo, _) = Xmpp::login(&url, DOMAIN, "1001-76730", key, "logged")
        .await
        .unwrap();
    demo.send(r#"<iq type="get" id="p" xmlns="jabber:client"><ping xmlns="urn:xmpp:ping"/></iq>"#)
        .await;
    demo.recv().await.unwrap();
    demo.send(&format!(r#"<close xmlns="{FRAMING}"/>"#)).await;
    assert!(demo.recv().await.unwrap().starts_with("<close"));
    let lines = peer_line(vec![
        "client=\"access-line-test\"".into(),
        "identity=\"demo\"".into(),
        "user=1001".into(),
        "reason=\"client closed\"".into(),
    ])
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(line.contains("transport=\"websocket\""), "{line}");
    // In: bind, session, presence, ping. Out: the features after the
    // restart, and the three answers. (Stream opens and closes are not
    // elements.)
    assert!(line.contains("stanzas_in=4"), "{line}");
    assert!(line.contains("stanzas_out=4"), "{line}");
    assert!(!line.contains(&h.token()[..12]), "{line}");

    let refused = Xmpp::login(&url, DOMAIN, "9999-76730", key, "x").await;
    assert!(refused.is_err());
    let lines = peer_line(vec![
        "client=\"access-line-test\"".into(),
        "user=9999".into(),
        "reason=\"unknown user\"".into(),
    ])
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
}

/// A pool member's user chats with the member's session once it has one
/// (members make theirs on first use); counted under the member and its
/// pool.
#[tokio::test]
async fn a_pool_members_user_chats_with_the_members_session() {
    let sim = qbproxy_sim::Sim::start(qbproxy_sim::SimConfig::demo().with_users(
        "loadtest-{n}",
        "pw-{n}",
        1..=2,
    ))
    .await
    .unwrap();
    let h = with_chat(&sim, "")
        .identity(DEMO)
        .pool_table("name = \"load\"\nlogin = \"loadtest-{n}\"\ncount = 2\npassword = \"pw-{n}\"\npath_prefix = \"/load\"\n")
        .start()
        .await;
    h.ready().await;
    let url = chat_url(&h);
    // Before any use, the member holds no session: refused, as unknown.
    let early = Xmpp::login(&url, DOMAIN, "100002-76730", PLACEHOLDER, "a").await;
    assert!(early
        .err()
        .unwrap()
        .contains("holds no session for user 100002"));
    // Round robin: two calls, both members' sessions.
    for _ in 0..2 {
        assert_eq!(h.get("/load/users.json").await.status, 200);
    }
    Xmpp::login(&url, DOMAIN, "100002-76730", PLACEHOLDER, "a")
        .await
        .expect("the member's session");
    assert_eq!(logins(&sim), [(100_002, Token)]);
    assert_eq!(
        h.metric("qbproxy_chat_logins_total{identity=\"load-2\",pool=\"load\",outcome=\"ok\"}"),
        1,
        "{}",
        h.handle.metrics_text()
    );
}

/// `chat.max_connections` holds: past it a new connection is closed at
/// once, and a slot freed serves the next.
#[tokio::test]
async fn chat_connections_are_capped() {
    let h = both("max_connections = 1\n").await;
    let url = chat_url(&h);
    let (mut first, _) = Xmpp::login(&url, DOMAIN, "1001-76730", PLACEHOLDER, "a")
        .await
        .unwrap();
    // Refused before the WebSocket handshake: the connection just closes.
    let host = url.trim_start_matches("ws://").to_owned();
    let mut second = tokio::net::TcpStream::connect(&host).await.unwrap();
    let mut buf = [0u8; 16];
    let read = crate::common::bounded(
        "the refused connection to close",
        tokio::io::AsyncReadExt::read(&mut second, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed, not served: {read:?}"
    );
    first.send(&format!(r#"<close xmlns="{FRAMING}"/>"#)).await;
    assert!(first.recv().await.unwrap().starts_with("<close"));
    h.metric_becomes("qbproxy_chat_connections{transport=\"websocket\"}", 0)
        .await;
    Xmpp::login(&url, DOMAIN, "1002-76730", PLACEHOLDER, "b")
        .await
        .expect("the freed slot serves the next");
}

/// `chat.idle_timeout` ends a logged-in connection nothing moves on, with
/// `connection-timeout`, and its slot is freed.
#[tokio::test]
async fn an_idle_chat_connection_is_closed() {
    let h = both("idle_timeout = \"300ms\"\n").await;
    let (mut idle, _) = Xmpp::login(&chat_url(&h), DOMAIN, "1001-76730", PLACEHOLDER, "a")
        .await
        .unwrap();
    let error = idle.recv().await.expect("a stream error");
    assert!(error.contains("connection-timeout"), "{error}");
    assert!(idle.recv().await.unwrap().starts_with("<close"));
    h.metric_becomes("qbproxy_chat_connections{transport=\"websocket\"}", 0)
        .await;
}

/// The chat server over TLS (`wss://`, as QuickBlox's on 5291): qbproxy
/// verifies its certificate against `upstream.ca_file` and logs in; a
/// server whose certificate no trusted CA signed is refused (the TLS
/// handshake fails before any login), with a failure that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_server_is_reached_over_tls_and_its_certificate_checked() {
    use crate::common::certs::{Ca, Dir};
    use crate::common::prosody::Prosody;
    let ca = Ca::new("chat server CA");
    let prosody = Prosody::start_tls(&ca.ecdsa_leaf()).await;
    let dir = Dir::new("chat-upstream-ca");
    let sim = demo_sim().await;
    let trusting = |ca_pem: &str| {
        setup()
            .sim(sim.clone())
            .set("upstream", "ca_file", dir.write("ca.pem", ca_pem))
            .raw_table(&format!(
                "[chat]\nwebsocket_addr = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
                prosody.ws_url()
            ))
            .identity(DEMO)
    };
    let h = trusting(&ca.pem).start().await;
    h.ready().await;
    prosody.register("1001-76730", &h.token()).await;
    let (_c, jid) = Xmpp::login(&chat_url(&h), "localhost", "1001-76730", PLACEHOLDER, "t")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", prosody.log()));
    assert_eq!(jid, "1001-76730@localhost/t");

    let stranger = Ca::new("not the chat server's CA");
    let h = trusting(&stranger.pem).start().await;
    h.ready().await;
    let refused = Xmpp::login(&chat_url(&h), "localhost", "1001-76730", PLACEHOLDER, "u").await;
    let refused = refused.err().unwrap();
    assert!(refused.contains("temporary-auth-failure"), "{refused}");
    assert!(refused.contains("TLS"), "{refused}");
    assert_eq!(
        h.metric("qbproxy_chat_logins_total{identity=\"demo\",pool=\"\",outcome=\"failed\"}"),
        1
    );
}

/// A client that stops reading does not hold its connection (and the chat
/// server's) for ever: once a write to it waits `limits.send_timeout`,
/// qbproxy closes it, while the sender is served on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout() {
    let sim = demo_sim().await;
    let h = with_chat(&sim, "tcp_addr = \"127.0.0.1:0\"\n")
        .set("limits", "send_timeout", "300ms")
        .identity(DEMO)
        .identity(OTHER)
        .start()
        .await;
    h.ready().await;
    assert_eq!(h.get_as("other", "/users.json").await.status, 200);
    let tcp_addr = h.handle.chat_tcp_addr().unwrap();
    // Logged in, then never reads again.
    let _deaf = XmppTcp::login(tcp_addr, "1001-76730", PLACEHOLDER, "deaf", None).await;
    let (mut sender, _) = Xmpp::login(&chat_url(&h), DOMAIN, "1002-76730", PLACEHOLDER, "s")
        .await
        .unwrap();
    let body = "y".repeat(60_000);
    let message = format!(
        r#"<message to="1001-76730@chat.example" type="chat" xmlns="jabber:client"><body>{body}</body></message>"#
    );
    // Far more than the kernel buffers between qbproxy and the deaf client.
    for _ in 0..300 {
        sender.send(&message).await;
    }
    h.metric_becomes("qbproxy_chat_connections{transport=\"tcp\"}", 0)
        .await;
    // The sender is served on.
    sender
        .send(
            r#"<iq type="get" id="still" xmlns="jabber:client"><ping xmlns="urn:xmpp:ping"/></iq>"#,
        )
        .await;
    // (Messages the chat server could no longer deliver to the closed
    // client may come back as errors first.)
    loop {
        let m = sender.recv().await.expect("the ping's answer");
        if m.contains("still") {
            assert!(is_result(&m), "{m}");
            break;
        }
        assert!(m.contains("service-unavailable"), "{m}");
    }
}
