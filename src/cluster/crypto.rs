//! Tokens are kept in Redis encrypted: AES-256-GCM under a key derived
//! (HKDF-SHA256) from the application's auth secret. Whoever reads Redis
//! without the secret cannot use a token; every replica of one application
//! derives the same key. The key name is the associated data, so a value
//! copied under another identity's key does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// Seals and opens the fleet's values.
pub struct Vault {
    key: LessSafeKey,
    rng: SystemRandom,
}

/// The HKDF salt and info: a change of either is a new key (and stored
/// sessions are simply not adopted: each replica creates its own).
const SALT: &[u8] = b"qbproxy fleet v1";
const INFO: &[u8] = b"session tokens";

impl Vault {
    pub fn new(auth_secret: &[u8]) -> Vault {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(auth_secret);
        let mut bytes = [0u8; 32];
        // HKDF-SHA256 expands 32 bytes without fail (the limit is 255 × 32).
        if let Ok(okm) = prk.expand(&[INFO], &AES_256_GCM) {
            let _ = okm.fill(&mut bytes);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes)
            .unwrap_or_else(|_| unreachable!("32 bytes make an AES-256 key"));
        Vault {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// `nonce || ciphertext || tag`, bound to `aad`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out,
            )
            .ok()?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Some(sealed)
    }

    /// The plaintext, if `sealed` was sealed with this key and `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_secret_and_key_name() {
        let vault = Vault::new(b"auth-secret");
        let sealed = vault.seal(b"the-token", b"qbproxy:s:abc").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"the-token"));
        assert_eq!(vault.open(&sealed, b"qbproxy:s:abc").unwrap(), b"the-token");
        assert!(vault.open(&sealed, b"qbproxy:s:other").is_none());
        assert!(Vault::new(b"another-secret")
            .open(&sealed, b"qbproxy:s:abc")
            .is_none());
        // A fresh nonce every time.
        assert_ne!(
            vault.seal(b"x", b"k").unwrap(),
            vault.seal(b"x", b"k").unwrap()
        );
        assert!(vault.open(b"short", b"k").is_none());
    }
}
