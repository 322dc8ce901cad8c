//! `[state] file`: the sessions a replica holds, kept across its restart
//! without Redis, so that a restart (or an in-place upgrade) logs nobody
//! in again: a pool of 5,000 members is 5,000 logins against QuickBlox's
//! rate limit otherwise.
//!
//! Written on shutdown, once requests have drained; read at start, where
//! each identity's first session comes from it if it holds one for the
//! same credentials (the fleet's fingerprint) that has not lapsed. Tokens
//! are sealed as the fleet seals them in Redis (AES-256-GCM under a key
//! derived from the auth secret, the fingerprint as associated data): the
//! file is useless without the secret, and an entry of another
//! application, or moved to another identity, does not open and is
//! ignored. The file is written whole to a temporary file and renamed
//! (mode 0600), so a crash never leaves half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cluster::Vault;
use crate::quickblox::credentials::Secret;
use crate::session::{Attempt, BoxFuture, Held, NewSession, Origin, Reason, SessionError, Source};

/// A restored session is used only if it has at least this long to live.
const MIN_LEFT: Duration = Duration::from_secs(60);

/// The state file of one application.
pub struct StateFile {
    path: PathBuf,
    vault: Vault,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FileV1 {
    version: u32,
    /// Fingerprint → sealed `Entry`, hex.
    sessions: HashMap<String, String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    token: String,
    user_id: u64,
    expires_ms: u64,
    public: serde_json::Map<String, serde_json::Value>,
}

impl StateFile {
    pub fn new(path: &Path, auth_secret: &[u8]) -> StateFile {
        StateFile {
            path: path.to_owned(),
            vault: Vault::new(auth_secret),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sessions the file holds that open with this application's key
    /// and have not lapsed, by fingerprint. A missing file holds none; one
    /// that cannot be read is logged and holds none.
    pub fn load(&self) -> HashMap<String, Held> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read the state file ([state] file); every session is created anew");
                return HashMap::new();
            }
        };
        let file: FileV1 = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "the state file ([state] file) is not one qbproxy wrote; every session is created anew");
                return HashMap::new();
            }
        };
        let now = SystemTime::now();
        let mut out = HashMap::new();
        for (fingerprint, sealed) in file.sessions {
            let Some(plain) = hex::decode(&sealed)
                .ok()
                .and_then(|b| self.vault.open(&b, fingerprint.as_bytes()))
            else {
                continue;
            };
            let Ok(e) = serde_json::from_slice::<Entry>(&plain) else {
                continue;
            };
            let expires_at = UNIX_EPOCH + Duration::from_millis(e.expires_ms);
            if expires_at <= now + MIN_LEFT {
                continue;
            }
            out.insert(
                fingerprint,
                Held {
                    token: Secret::new(e.token),
                    fleet: None,
                    expires_at,
                    user_id: e.user_id,
                    public: e.public,
                },
            );
        }
        out
    }

    /// Writes these sessions (replacing the file). Returns how many.
    pub fn save(&self, sessions: &[(String, Held)]) -> std::io::Result<usize> {
        let mut file = FileV1 {
            version: 1,
            sessions: HashMap::with_capacity(sessions.len()),
        };
        for (fingerprint, held) in sessions {
            let entry = Entry {
                token: held.token.expose().to_owned(),
                user_id: held.user_id,
                expires_ms: crate::cluster::unix_ms(held.expires_at),
                public: held.public.clone(),
            };
            let plain = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            let sealed = self
                .vault
                .seal(&plain, fingerprint.as_bytes())
                .ok_or_else(|| std::io::Error::other("sealing failed"))?;
            file.sessions
                .insert(fingerprint.clone(), hex::encode(sealed));
        }
        let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".qbproxy-state-")
            .tempfile_in(dir)?;
        tmp.write_all(&text)?;
        tmp.as_file().sync_all()?;
        // tempfile creates it 0600 already; rename keeps the mode.
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(file.sessions.len())
    }
}

/// A [`Source`] whose first startup creation is answered with a session
/// restored from the state file, if it still lives; everything else goes
/// to the wrapped source.
pub struct Restored {
    inner: Box<dyn Source>,
    session: Mutex<Option<Held>>,
}

impl Restored {
    pub fn new(inner: Box<dyn Source>, session: Held) -> Restored {
        Restored {
            inner,
            session: Mutex::new(Some(session)),
        }
    }
}

impl Source for Restored {
    fn create(&self, attempt: Attempt) -> BoxFuture<'_, Result<NewSession, SessionError>> {
        let restored = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|_| attempt.reason == Reason::Startup);
        match restored {
            Some(held) if held.expires_at > SystemTime::now() + MIN_LEFT => {
                let session = NewSession {
                    token: held.token,
                    user_id: held.user_id,
                    lifetime: held
                        .expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default(),
                    public: held.public,
                    origin: Origin::StateFile,
                    ..NewSession::default()
                };
                Box::pin(async move { Ok(session) })
            }
            _ => self.inner.create(attempt),
        }
    }

    fn sync(&self, attempt: Attempt) -> BoxFuture<'_, Option<NewSession>> {
        self.inner.sync(attempt)
    }

    fn sync_every(&self) -> Option<Duration> {
        self.inner.sync_every()
    }

    fn rejoins(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.rejoins()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(token: &str, left: Duration) -> Held {
        Held {
            token: Secret::new(token),
            fleet: None,
            expires_at: SystemTime::now() + left,
            user_id: 7,
            public: serde_json::Map::new(),
        }
    }

    /// What is saved is read back; a lapsed entry, one of another
    /// application (another secret) and one moved under another identity's
    /// fingerprint are ignored; the token is not in the file in the clear.
    #[test]
    fn sessions_round_trip_sealed_and_only_for_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let file = StateFile::new(&path, b"secret");
        let saved = file
            .save(&[
                (
                    "fp-a".into(),
                    held("tok-aaaaaaaaaaaa", Duration::from_secs(3600)),
                ),
                (
                    "fp-b".into(),
                    held("tok-bbbbbbbbbbbb", Duration::from_secs(5)),
                ),
            ])
            .unwrap();
        assert_eq!(saved, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("tok-aaaa"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");

        let loaded = file.load();
        assert_eq!(loaded.len(), 1, "the lapsing one is dropped");
        assert_eq!(loaded["fp-a"].token.expose(), "tok-aaaaaaaaaaaa");
        assert_eq!(loaded["fp-a"].user_id, 7);

        assert!(StateFile::new(&path, b"another secret").load().is_empty());
        let moved = text.replace("fp-a", "fp-c");
        std::fs::write(&path, moved).unwrap();
        assert!(file.load().is_empty(), "an entry moved to another identity");
        std::fs::write(&path, "not json").unwrap();
        assert!(file.load().is_empty());
        std::fs::remove_file(&path).unwrap();
        assert!(file.load().is_empty());
    }
}
