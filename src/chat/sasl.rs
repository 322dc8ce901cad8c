//! SASL as XMPP uses it (RFC 6120 §6): PLAIN (RFC 4616) read from a client
//! and written to the chat server, and SCRAM-SHA-1 (RFC 5802) for a chat
//! server that offers only that.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};

/// A PLAIN message: `authzid \0 authcid \0 password`, base64.
#[derive(Debug, PartialEq)]
pub(crate) struct Plain {
    pub authzid: String,
    pub authcid: String,
    pub password: String,
}

impl Plain {
    pub fn decode(b64: &str) -> Option<Plain> {
        let bytes = STANDARD.decode(b64.trim()).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, '\0');
        Some(Plain {
            authzid: parts.next()?.to_owned(),
            authcid: parts.next()?.to_owned(),
            password: parts.next()?.to_owned(),
        })
    }

    /// The JID's local part the client logs in as: the authentication
    /// identity, or the authorization identity's local part if that is all
    /// it sent (XMPP clients differ).
    pub fn local(&self) -> &str {
        let who = if self.authcid.is_empty() {
            &self.authzid
        } else {
            &self.authcid
        };
        who.split('@').next().unwrap_or("")
    }

    pub fn encode(authcid: &str, password: &str) -> String {
        STANDARD.encode(format!("\0{authcid}\0{password}"))
    }
}

/// A SCRAM-SHA-1 client exchange (RFC 5802, no channel binding: `n,,`).
pub(crate) struct Scram {
    password: String,
    client_first_bare: String,
    nonce: String,
    /// The server's signature to expect in its final message.
    server_signature: Option<[u8; 20]>,
}

type HmacSha1 = Hmac<Sha1>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 20] {
    let mut mac =
        HmacSha1::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA1 with one block: SCRAM's `Hi()`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 20] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

/// `=` and `,` escaped in a SCRAM name (RFC 5802 §5.1).
fn saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

impl Scram {
    pub fn new(user: &str, password: &str, nonce: &str) -> Scram {
        Scram {
            password: password.to_owned(),
            client_first_bare: format!("n={},r={nonce}", saslname(user)),
            nonce: nonce.to_owned(),
            server_signature: None,
        }
    }

    /// The client's first message, base64 (the `<auth>` text).
    pub fn first(&self) -> String {
        STANDARD.encode(format!("n,,{}", self.client_first_bare))
    }

    /// The answer to the server's challenge (base64 in, base64 out).
    pub fn respond(&mut self, challenge_b64: &str) -> Option<String> {
        let server_first = String::from_utf8(STANDARD.decode(challenge_b64.trim()).ok()?).ok()?;
        let field = |k: &str| {
            server_first
                .split(',')
                .find_map(|f| f.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        let nonce = field("r")?;
        if !nonce.starts_with(&self.nonce) {
            return None;
        }
        let salt = STANDARD.decode(field("s")?).ok()?;
        let iterations: u32 = field("i")?.parse().ok().filter(|i| *i > 0)?;
        let salted = hi(self.password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 20] = Sha1::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Some(STANDARD.encode(format!("{without_proof},p={}", STANDARD.encode(proof))))
    }

    /// Whether the server's final message (`<success>`'s text) proves it
    /// knew the password too.
    pub fn verify(&self, success_b64: &str) -> bool {
        let Some(expected) = self.server_signature else {
            return false;
        };
        let Ok(text) = STANDARD.decode(success_b64.trim()) else {
            return false;
        };
        let text = String::from_utf8_lossy(&text);
        text.strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .is_some_and(|v| v == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_is_read_as_clients_send_it_and_written_as_servers_take_it() {
        let p = Plain::decode(&STANDARD.encode("\u{0}1001-76730\u{0}any placeholder")).unwrap();
        assert_eq!(p.local(), "1001-76730");
        assert_eq!(p.password, "any placeholder");
        let p = Plain::decode(&STANDARD.encode("1001-76730@chat.example\u{0}\u{0}pw")).unwrap();
        assert_eq!(p.local(), "1001-76730");
        assert_eq!(Plain::decode("not base64!"), None);
        assert_eq!(Plain::decode(&STANDARD.encode("no separators")), None);
        assert_eq!(
            Plain::decode(&Plain::encode("1001-76730", "tok\u{0}en"))
                .unwrap()
                .password,
            "tok\u{0}en"
        );
    }

    /// RFC 5802 §5's example exchange, byte for byte.
    #[test]
    fn scram_sha1_matches_rfc_5802() {
        let mut s = Scram::new("user", "pencil", "fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(
            STANDARD.decode(s.first()).unwrap(),
            b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
        );
        let challenge = STANDARD
            .encode("r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096");
        let answer = s.respond(&challenge).unwrap();
        assert_eq!(
            String::from_utf8(STANDARD.decode(answer).unwrap()).unwrap(),
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        assert!(s.verify(&STANDARD.encode("v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")));
        assert!(!s.verify(&STANDARD.encode("v=AAAAAAAAAAAAAAAAAAAAAAAAAAA=")));
        // A server nonce that does not extend ours is refused.
        let mut s = Scram::new("user", "pencil", "abc");
        assert_eq!(
            s.respond(&STANDARD.encode("r=xyz,s=QSXCR+Q6sek8bf92,i=1")),
            None
        );
    }
}
