//! `[cluster]`: replicas share sessions, set-asides and the upstream rate
//! through Redis, so a fleet behaves like one proxy.
//!
//! Key layout (`P` is `cluster.key_prefix`; `F` an identity's fingerprint,
//! see [`fingerprint`], in braces: the hash tag that puts an identity's keys
//! in one Redis Cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:s:{F}` | hash | `gen` (the session's fleet generation), `exp` (when it lapses, Unix ms), `blob` (token, user id and public fields, sealed: `crypto.rs`); expires with the session |
//! | `P:l:{F}` | string | the renewal lock: its owner, with a lease of `cluster.lock_ttl`, renewed while its holder creates |
//! | `P:a:{F}` | string | set aside: QuickBlox refused this pool member's credentials |
//! | `P:rate` | string | the fleet's `upstream.rate` (GCRA: the theoretical arrival time, µs) |
//! | `P:replicas` | sorted set | replica id → last heartbeat (ms), for the rate's fallback share |
//! | `P:n:{F}` | pub/sub channel | the generation just stored: wakes replicas waiting for it |
//!
//! Every call is bounded by `cluster.redis_timeout`. A call that fails or
//! times out marks Redis down (logged once per change, `qbproxy_cluster_up`)
//! and its caller falls back to what the replica does alone. While Redis is
//! down no call waits on it: callers fall back at once, and the heartbeat
//! probes Redis every second; the first answer marks it up again, and the
//! renewal tasks then sync with the fleet. The renewal protocol is in
//! `fleet.rs`.

mod crypto;
mod fleet;
mod link;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rand::Rng;
use redis::{AsyncCommands, RedisResult, Script};

pub use self::crypto::Vault;
pub use self::fleet::FleetSource;
use self::link::{Conn, Link};
pub use self::link::{RedisTls, Topology};

use crate::config::{ClusterConfig, Config, IdentityConfig};
use crate::quickblox::credentials::Credentials;
use crate::telemetry::metrics::Metrics;

/// A cheap-to-clone handle on the fleet's Redis.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    prefix: String,
    timeout: Duration,
    lock_ttl: Duration,
    /// This replica, in the heartbeat set and as lock owner prefix.
    replica: String,
    /// The Redis server's address (never the URL: it may hold a password).
    server: String,
    /// `UNKNOWN` until the first call, then `UP` or `DOWN`.
    state: AtomicU8,
    /// Replicas with a heartbeat in the last minute (at least 1: this one).
    alive: AtomicUsize,
    metrics: Metrics,
    vault: Vault,
    scripts: Scripts,
    /// Counts the times Redis answered again after it was down. Its
    /// receivers also learn that the cluster is gone (the sender drops).
    rejoins: tokio::sync::watch::Sender<u64>,
    /// Replicas' renewal tasks waiting for another's session, by
    /// fingerprint: woken by the pub/sub message its storing sends.
    waiting: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// The listener is subscribed: waiters may poll slowly.
    subscribed: AtomicBool,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Redis did not answer in time, or answered with an error: the caller
/// falls back to what the replica does alone.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("Redis is unavailable")]
pub struct Down;

/// A session as the fleet stores it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its fleet generation: one more than the session it replaced.
    pub generation: u64,
    /// When it lapses unless used again (the latest any replica saw).
    pub expires: SystemTime,
    pub token: crate::quickblox::credentials::Secret,
    pub user_id: u64,
    pub public: serde_json::Map<String, serde_json::Value>,
}

/// How often each replica says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often a replica that finds Redis down tries again: the heartbeat is
/// also how the fleet notices Redis is back when no request needs it.
const PROBE: Duration = Duration::from_secs(1);
/// A replica without a heartbeat for this long no longer counts.
const ALIVE_WINDOW: Duration = Duration::from_secs(60);

impl Cluster {
    /// Connects lazily: Redis need not answer for qbproxy to start. The
    /// key is derived from the application's auth secret.
    pub fn new(
        config: &ClusterConfig,
        auth_secret: &[u8],
        metrics: &Metrics,
    ) -> Result<Cluster, redis::RedisError> {
        let link = Link::new(&config.topology, &config.tls, config.redis_timeout)?;
        // Where, for the log: addresses, no password.
        let server = config.topology.describe();
        let replica: u64 = rand::rng().random();
        metrics.cluster_up(false);
        metrics.cluster_replicas(1);
        Ok(Cluster {
            inner: Arc::new(Inner {
                link,
                prefix: config.key_prefix.clone(),
                timeout: config.redis_timeout,
                lock_ttl: config.lock_ttl,
                replica: format!("{replica:016x}"),
                server,
                state: AtomicU8::new(UNKNOWN),
                alive: AtomicUsize::new(1),
                metrics: metrics.clone(),
                vault: Vault::new(auth_secret),
                scripts: Scripts::default(),
                rejoins: tokio::sync::watch::Sender::new(0),
                waiting: Mutex::new(HashMap::new()),
                subscribed: AtomicBool::new(false),
            }),
        })
    }

    /// Says this replica is alive every [`HEARTBEAT`], and counts the
    /// others; while Redis is down, tries every [`PROBE`] instead, so the
    /// fleet notices within a second that it is back. Runs until the app
    /// ends (the task holds the cluster weakly).
    pub fn start_heartbeat(&self) {
        tracing::info!(
            redis = %self.inner.server,
            key_prefix = %self.inner.prefix,
            replica = %self.inner.replica,
            "[cluster]: sessions and the upstream rate are shared through Redis"
        );
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut last: Option<tokio::time::Instant> = None;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let cluster = Cluster { inner };
                let due = match last {
                    None => true,
                    Some(at) => !cluster.is_up() || at.elapsed() >= HEARTBEAT,
                };
                if due {
                    cluster.heartbeat().await;
                    last = Some(tokio::time::Instant::now());
                }
                drop(cluster);
                tokio::time::sleep(PROBE).await;
            }
        });
    }

    /// Listens for stored sessions (`PSUBSCRIBE P:n:*`) and wakes the
    /// renewal tasks waiting for them, so a replica adopts another's
    /// renewal as soon as it is stored rather than at its next poll.
    /// Polling stays the fallback: a lost message costs at most one poll
    /// interval. Reconnects every second while Redis is away; ends with
    /// the cluster.
    pub fn start_listener(&self) {
        let weak = Arc::downgrade(&self.inner);
        let mut gone = self.inner.rejoins.subscribe();
        let pattern = self.key("n:*");
        let prefix = self.key("n:");
        let timeout = self.inner.timeout;
        tokio::spawn(async move {
            // Why the last subscription failed: logged once per change.
            let mut refused: Option<String> = None;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let subscribed = tokio::time::timeout(timeout, async {
                    let mut pubsub = inner.link.pubsub().await?;
                    pubsub.psubscribe(&pattern).await?;
                    RedisResult::Ok(pubsub)
                })
                .await;
                drop(inner);
                let why = match &subscribed {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(redis_error(e)),
                    Err(_) => Some(format!("no answer within {timeout:?}")),
                };
                if why != refused {
                    match &why {
                        Some(why) => tracing::warn!(
                            error = %why,
                            pattern = %pattern,
                            "cannot subscribe to the fleet's announcements (PSUBSCRIBE): replicas \
                             waiting for another's session poll for it instead \
                             (qbproxy_cluster_subscribed 0)"
                        ),
                        None if refused.is_some() => {
                            tracing::info!("subscribed to the fleet's announcements again")
                        }
                        None => {}
                    }
                    refused = why;
                }
                if let Ok(Ok(pubsub)) = subscribed {
                    let mut messages = pubsub.into_on_message();
                    set_subscribed(&weak, true);
                    loop {
                        let message = tokio::select! {
                            m = messages.next() => m,
                            r = gone.changed() => match r {
                                Ok(()) => continue,
                                Err(_) => return,
                            },
                        };
                        let Some(message) = message else { break };
                        let Some(inner) = weak.upgrade() else { return };
                        let channel = message.get_channel_name();
                        let fp = channel
                            .strip_prefix(&prefix)
                            .and_then(|c| c.strip_prefix('{')?.strip_suffix('}'));
                        if let Some(fp) = fp {
                            let waiting = inner.waiting.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(signal) = waiting.get(fp) {
                                signal.notify_waiters();
                            }
                        }
                    }
                }
                // Redis is away, or the subscription ended: try again soon.
                set_subscribed(&weak, false);
                tokio::select! {
                    () = tokio::time::sleep(PROBE) => {}
                    r = gone.changed() => if r.is_err() { return },
                }
            }
        });
    }

    /// True while stored sessions are announced to this replica: a waiter
    /// need not poll often.
    pub fn subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Relaxed)
    }

    /// A signal for a renewal task about to wait for another replica's
    /// session for `fingerprint`; it fires when one is stored.
    pub fn waiter(&self, fingerprint: &str) -> Waiter {
        let signal = self
            .inner
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fingerprint.to_owned())
            .or_default()
            .clone();
        Waiter {
            cluster: self.clone(),
            fingerprint: fingerprint.to_owned(),
            signal,
        }
    }

    fn stored_channel(&self, fingerprint: &str) -> String {
        self.tagged("n", fingerprint)
    }

    async fn heartbeat(&self) {
        let key = self.key("replicas");
        let now = unix_ms(SystemTime::now());
        let stale = now.saturating_sub(ALIVE_WINDOW.as_millis() as u64);
        let replica = self.inner.replica.clone();
        let (key, replica) = (&key, &replica);
        let counted = self
            .attempt(|mut conn| async move {
                let (_, _, alive): (i64, i64, usize) = redis::pipe()
                    .zadd(key, replica, now)
                    .zrembyscore(key, "-inf", stale)
                    .zcard(key)
                    .query_async(&mut conn)
                    .await?;
                Ok(alive)
            })
            .await;
        if let Ok(n) = counted {
            self.inner.alive.store(n.max(1), Ordering::Relaxed);
            self.inner.metrics.cluster_replicas(n.max(1));
        }
    }

    /// Replicas seen alive in the last minute, this one included.
    pub fn alive(&self) -> usize {
        self.inner.alive.load(Ordering::Relaxed).max(1)
    }

    /// Moves each time Redis answers again after it was down: the renewal
    /// tasks sync with the fleet then.
    pub fn rejoins(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.rejoins.subscribe()
    }

    /// True while the last call answered.
    pub fn is_up(&self) -> bool {
        self.inner.state.load(Ordering::Relaxed) == UP
    }

    pub fn lock_ttl(&self) -> Duration {
        self.inner.lock_ttl
    }

    /// A lock owner unique to this replica and call.
    pub fn new_owner(&self) -> String {
        let n: u64 = rand::rng().random();
        format!("{}-{n:016x}", self.inner.replica)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.inner.prefix)
    }

    /// An identity's key of `kind`: `P:kind:{F}`. The fingerprint is the
    /// hash tag, so a Redis Cluster keeps an identity's session and lock
    /// in one slot (a script may touch both).
    fn tagged(&self, kind: &str, fingerprint: &str) -> String {
        format!("{}:{kind}:{{{fingerprint}}}", self.inner.prefix)
    }

    /// Runs one Redis call within `redis_timeout`, unless Redis is known
    /// to be down: then callers fall back at once rather than each wait
    /// `redis_timeout`, and the heartbeat's probe is what brings it back.
    /// `call` makes the call on a connection it is given.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, Down>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.inner.state.load(Ordering::Relaxed) == DOWN {
            return Err(Down);
        }
        self.attempt(call).await
    }

    /// Runs one Redis call within `redis_timeout`, whatever the state,
    /// keeping the up/down state (and its log line and metric) up to date.
    /// A call that fails because its connection dropped (Redis restarted,
    /// `CLIENT KILL`, an idle connection a proxy closed) is made once more
    /// on a fresh one before Redis counts as down: a dropped connection
    /// alone must not make every replica renew on its own.
    async fn attempt<T, F, Fut>(&self, call: F) -> Result<T, Down>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let timeout = self.inner.timeout;
        let once = || async {
            let conn = self.inner.link.conn().await?;
            call(conn).await
        };
        let mut outcome = tokio::time::timeout(timeout, once()).await;
        if let Ok(Err(e)) = &outcome {
            let moved = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
            if e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal() || moved {
                tracing::debug!(error = %e, "the Redis connection dropped (or its server is no longer the master); trying once more on a new one");
                self.inner.link.reset();
                self.inner.metrics.cluster_reconnect();
                outcome = tokio::time::timeout(timeout, once()).await;
            }
        }
        let (up, why) = match &outcome {
            Ok(Ok(_)) => (true, String::new()),
            Ok(Err(e)) => (false, redis_error(e)),
            Err(_) => (false, format!("no answer within {:?}", self.inner.timeout)),
        };
        let new = if up { UP } else { DOWN };
        let old = self.inner.state.swap(new, Ordering::Relaxed);
        if old != new {
            self.inner.metrics.cluster_up(up);
            if up && old == DOWN {
                self.inner.rejoins.send_modify(|n| *n += 1);
            }
            if up {
                tracing::info!(
                    "Redis answers: sessions and the upstream rate are shared with the fleet"
                );
            } else {
                tracing::warn!(
                    error = %why,
                    "Redis is unavailable: this replica falls back to its own sessions and its share of the upstream rate"
                );
            }
        }
        match outcome {
            Ok(Ok(v)) => Ok(v),
            _ => Err(Down),
        }
    }

    fn session_key(&self, fingerprint: &str) -> String {
        self.tagged("s", fingerprint)
    }

    /// The session the fleet holds for an identity, if any that opens with
    /// this application's key and has not lapsed.
    pub async fn session(&self, fingerprint: &str) -> Result<Option<Stored>, Down> {
        let key = self.session_key(fingerprint);
        let key = &key;
        let k = &key;
        let fields: Vec<Option<Vec<u8>>> = self
            .run(|mut conn| async move {
                redis::cmd("HMGET")
                    .arg(k)
                    .arg("gen")
                    .arg("exp")
                    .arg("blob")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let [Some(generation), Some(expires), Some(blob)] =
            <[Option<Vec<u8>>; 3]>::try_from(fields).unwrap_or([None, None, None])
        else {
            return Ok(None);
        };
        let number = |v: Vec<u8>| String::from_utf8(v).ok()?.parse::<u64>().ok();
        let (Some(generation), Some(expires)) = (number(generation), number(expires)) else {
            return Ok(None);
        };
        let expires = UNIX_EPOCH + Duration::from_millis(expires);
        if expires <= SystemTime::now() {
            return Ok(None);
        }
        let Some(plain) = self.inner.vault.open(&blob, key.as_bytes()) else {
            return Ok(None);
        };
        let Ok(sealed) = serde_json::from_slice::<Sealed>(&plain) else {
            return Ok(None);
        };
        Ok(Some(Stored {
            generation,
            expires,
            token: crate::quickblox::credentials::Secret::new(sealed.token),
            user_id: sealed.user_id,
            public: sealed.public,
        }))
    }

    /// Takes the renewal lock for `lock_ttl`, if nobody holds it.
    pub async fn try_lock(&self, fingerprint: &str, owner: &str) -> Result<bool, Down> {
        let key = self.tagged("l", fingerprint);
        let ttl = self.inner.lock_ttl.as_millis() as u64;
        let owner = owner.to_owned();
        let (key, owner) = (&key, &owner);
        let set: Option<String> = self
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// True while someone holds the renewal lock.
    pub async fn locked(&self, fingerprint: &str) -> Result<bool, Down> {
        let key = self.tagged("l", fingerprint);
        let key = &key;
        self.run(|mut conn| async move { conn.exists(key).await })
            .await
    }

    /// Renews the lock's lease (`lock_ttl` from now) if `owner` still holds
    /// it. False: the lock is gone (its lease ran out) or another's.
    pub async fn prolong(&self, fingerprint: &str, owner: &str) -> Result<bool, Down> {
        let key = self.tagged("l", fingerprint);
        let script = self.inner.scripts.prolong.clone();
        let owner = owner.to_owned();
        let ttl = self.inner.lock_ttl.as_millis() as u64;
        let (key, owner, script) = (&key, &owner, &script);
        let renewed: i64 = self
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(owner)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(renewed == 1)
    }

    /// Releases the lock if `owner` still holds it (compare and delete).
    pub async fn unlock(&self, fingerprint: &str, owner: &str) -> Result<(), Down> {
        let key = self.tagged("l", fingerprint);
        let script = self.inner.scripts.unlock.clone();
        let owner = owner.to_owned();
        let (key, owner, script) = (&key, &owner, &script);
        let _: i64 = self
            .run(|mut conn| async move { script.key(key).arg(owner).invoke_async(&mut conn).await })
            .await?;
        Ok(())
    }

    /// Stores a session created under the lock, as the next generation, if
    /// `owner` still holds the lock. Returns its generation, or `None` if
    /// the lock was lost (its lease ran out).
    pub async fn store(
        &self,
        fingerprint: &str,
        owner: &str,
        session: &Stored,
    ) -> Result<Option<u64>, Down> {
        let lock = self.tagged("l", fingerprint);
        let script = &self.inner.scripts.store;
        self.put(script, fingerprint, session, Some(&lock), &[owner])
            .await
    }

    /// Stores `session` as generation 1 if the fleet holds none: a replica
    /// that ran alone while Redis was away joins with its session. Returns
    /// the generation stored, or `None` if one was there already.
    pub async fn publish_if_absent(
        &self,
        fingerprint: &str,
        session: &Stored,
    ) -> Result<Option<u64>, Down> {
        let script = &self.inner.scripts.publish;
        self.put(script, fingerprint, session, None, &[]).await
    }

    /// Stores `session` as the next generation if the fleet still holds
    /// generation `expected` (compare and set): a replica replaces a
    /// stored session QuickBlox refused with the one it made alone.
    /// Returns the generation stored, or `None` if another was first.
    pub async fn replace(
        &self,
        fingerprint: &str,
        expected: u64,
        session: &Stored,
    ) -> Result<Option<u64>, Down> {
        let script = &self.inner.scripts.replace;
        let expected = expected.to_string();
        self.put(script, fingerprint, session, None, &[&expected])
            .await
    }

    /// Runs one of the storing scripts (`store`, `publish`, `replace`):
    /// KEYS are the session's key and `lock` if any; ARGV are `args`, then
    /// the expiry, the sealed session and the channel the script publishes
    /// on. Returns the generation stored, or `None` if it stored nothing.
    async fn put(
        &self,
        script: &redis::Script,
        fingerprint: &str,
        session: &Stored,
        lock: Option<&str>,
        args: &[&str],
    ) -> Result<Option<u64>, Down> {
        let key = self.session_key(fingerprint);
        let channel = self.stored_channel(fingerprint);
        let blob = self.seal(&key, session).ok_or(Down)?;
        let mut invocation = script.key(&key);
        if let Some(lock) = lock {
            invocation.key(lock);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        invocation
            .arg(unix_ms(session.expires))
            .arg(blob)
            .arg(&channel);
        let invocation = &invocation;
        let generation: u64 = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok((generation > 0).then_some(generation))
    }

    /// Moves the stored expiry of generation `generation` to `expires` if
    /// that is later; returns the expiry the fleet holds now (`None` if it
    /// holds another generation, or none).
    pub async fn extend(
        &self,
        fingerprint: &str,
        generation: u64,
        expires: SystemTime,
    ) -> Result<Option<SystemTime>, Down> {
        let key = self.session_key(fingerprint);
        let script = self.inner.scripts.extend.clone();
        let (key, script) = (&key, &script);
        let held: u64 = self
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(generation)
                    .arg(unix_ms(expires))
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((held > 0).then(|| UNIX_EPOCH + Duration::from_millis(held)))
    }

    /// Marks a pool member set aside for the whole fleet.
    pub async fn set_aside(&self, fingerprint: &str) -> Result<(), Down> {
        let key = self.tagged("a", fingerprint);
        let key = &key;
        self.run(|mut conn| async move { conn.set(key, 1).await })
            .await
    }

    /// Clears a set-aside (a forced renewal on any replica).
    pub async fn clear_aside(&self, fingerprint: &str) -> Result<(), Down> {
        let key = self.tagged("a", fingerprint);
        let key = &key;
        self.run(|mut conn| async move { conn.del(key).await })
            .await
    }

    pub async fn is_aside(&self, fingerprint: &str) -> Result<bool, Down> {
        let key = self.tagged("a", fingerprint);
        let key = &key;
        self.run(|mut conn| async move { conn.exists(key).await })
            .await
    }

    /// One request's place in the fleet's `upstream.rate` (GCRA, one round
    /// trip): how long to wait before sending, or `None` if that would be
    /// longer than `max_wait` (nothing is taken then).
    pub async fn rate(
        &self,
        interval: Duration,
        burst: f64,
        max_wait: Duration,
    ) -> Result<Option<Duration>, Down> {
        let key = self.key("rate");
        let script = self.inner.scripts.rate.clone();
        let interval_us = interval.as_micros().max(1) as u64;
        let tolerance_us = (burst * interval_us as f64) as u64;
        let max_wait_us = max_wait.as_micros() as u64;
        let (key, script) = (&key, &script);
        let delay: i64 = self
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(interval_us)
                    .arg(tolerance_us)
                    .arg(max_wait_us)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((delay >= 0).then(|| Duration::from_micros(delay as u64)))
    }

    fn seal(&self, key: &str, session: &Stored) -> Option<Vec<u8>> {
        let plain = serde_json::to_vec(&Sealed {
            token: session.token.expose().to_owned(),
            user_id: session.user_id,
            public: session.public.clone(),
        })
        .ok()?;
        self.inner.vault.seal(&plain, key.as_bytes())
    }
}

/// A Redis error for the log: its kind, and the server's words for an
/// authentication or permission refusal (never a password: the server's
/// messages hold none).
fn redis_error(e: &redis::RedisError) -> String {
    match (e.kind(), e.code(), e.detail()) {
        (redis::ErrorKind::AuthenticationFailed, _, _) => {
            "AuthenticationFailed: Redis refused the user or password of cluster.redis_url".into()
        }
        (_, Some(code), Some(detail)) => format!("{code}: {detail}"),
        (kind, _, _) => format!("{kind:?}"),
    }
}

fn set_subscribed(inner: &std::sync::Weak<Inner>, on: bool) {
    if let Some(inner) = inner.upgrade() {
        if inner.subscribed.swap(on, Ordering::Relaxed) != on {
            inner.metrics.cluster_subscribed(on);
        }
    }
}

/// A renewal task's registration for news of a stored session; leaves the
/// table when the last waiter for that fingerprint is done.
pub struct Waiter {
    cluster: Cluster,
    fingerprint: String,
    pub signal: Arc<tokio::sync::Notify>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self
            .cluster
            .inner
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Ours and the table's: nobody else waits.
        if Arc::strong_count(&self.signal) <= 2 {
            waiting.remove(&self.fingerprint);
        }
    }
}

/// What is sealed in a stored session's `blob`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    token: String,
    user_id: u64,
    #[serde(default)]
    public: serde_json::Map<String, serde_json::Value>,
}

/// The Lua scripts, each one round trip and atomic.
struct Scripts {
    unlock: Arc<Script>,
    prolong: Arc<Script>,
    store: Arc<Script>,
    publish: Arc<Script>,
    replace: Arc<Script>,
    extend: Arc<Script>,
    rate: Arc<Script>,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            // Delete the lock only if it is still ours.
            unlock: Arc::new(Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('DEL', KEYS[1])
                  end
                  return 0",
            )),
            // Renew the lock's lease only if it is still ours.
            prolong: Arc::new(Script::new(
                r"if redis.call('GET', KEYS[1]) == ARGV[1] then
                    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
                  end
                  return 0",
            )),
            // Store the next generation only while holding the lock.
            store: Arc::new(Script::new(
                r"if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
                  local gen = (tonumber(redis.call('HGET', KEYS[1], 'gen')) or 0) + 1
                  redis.call('HSET', KEYS[1], 'gen', gen, 'exp', ARGV[2], 'blob', ARGV[3])
                  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
                  redis.call('PUBLISH', ARGV[4], gen)
                  return gen",
            )),
            // Generation 1, only if the fleet holds nothing.
            publish: Arc::new(Script::new(
                r"if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
                  redis.call('HSET', KEYS[1], 'gen', 1, 'exp', ARGV[1], 'blob', ARGV[2])
                  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
                  redis.call('PUBLISH', ARGV[3], 1)
                  return 1",
            )),
            // The next generation, only if the fleet still holds ARGV[1].
            replace: Arc::new(Script::new(
                r"local gen = tonumber(redis.call('HGET', KEYS[1], 'gen'))
                  if gen ~= tonumber(ARGV[1]) then return 0 end
                  gen = gen + 1
                  redis.call('HSET', KEYS[1], 'gen', gen, 'exp', ARGV[2], 'blob', ARGV[3])
                  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
                  redis.call('PUBLISH', ARGV[4], gen)
                  return gen",
            )),
            // A later expiry for the generation held; the expiry now.
            extend: Arc::new(Script::new(
                r"if tonumber(redis.call('HGET', KEYS[1], 'gen')) ~= tonumber(ARGV[1]) then return 0 end
                  local exp = tonumber(redis.call('HGET', KEYS[1], 'exp')) or 0
                  if tonumber(ARGV[2]) > exp then
                    exp = tonumber(ARGV[2])
                    redis.call('HSET', KEYS[1], 'exp', exp)
                    redis.call('PEXPIREAT', KEYS[1], exp)
                  end
                  return exp",
            )),
            // GCRA on Redis's clock: the delay before this request may go,
            // in µs, or -1 if it would be longer than the wait allowed.
            rate: Arc::new(Script::new(
                r"local t = redis.call('TIME')
                  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
                  local interval = tonumber(ARGV[1])
                  local tolerance = tonumber(ARGV[2])
                  local tat = tonumber(redis.call('GET', KEYS[1])) or now
                  if tat < now then tat = now end
                  local delay = tat + interval - tolerance - now
                  if delay < 0 then delay = 0 end
                  if delay > tonumber(ARGV[3]) then return -1 end
                  tat = tat + interval
                  redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1000)
                  return delay",
            )),
        }
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An identity as the fleet knows it: the application, the upstream, the
/// kind and who it logs in as (login or email; for social providers the
/// identity's name and project), never a password or token. Two replicas
/// whose `bot` logs in as different users get different fingerprints, so
/// they never share a session.
pub fn fingerprint(config: &Config, identity: &IdentityConfig) -> String {
    let who = match &identity.credentials {
        Credentials::Application => String::new(),
        Credentials::Login { login, .. } => login.clone(),
        Credentials::Email { email, .. } => email.clone(),
        Credentials::Facebook { .. } => identity.name.clone(),
        Credentials::FirebasePhone { project_id, .. } => {
            format!("{}\0{project_id}", identity.name)
        }
        // Never shared (an API key has no session), but named all the same.
        Credentials::ApiKey { on_behalf_of, .. } => {
            format!("{}\0{}", identity.name, on_behalf_of.unwrap_or(0))
        }
    };
    let parts = [
        config.quickblox.application_id.as_str(),
        config.upstream.authority.as_str(),
        identity.credentials.kind().as_str(),
        &who,
    ];
    let digest = ring::digest::digest(&ring::digest::SHA256, parts.join("\0").as_bytes());
    hex::encode(&digest.as_ref()[..16])
}
