//! The fleet's Redis, whatever stands in front of it: one server
//! (`redis://`, `rediss://`, `redis+unix://`), the master a set of Sentinels
//! names (`redis+sentinel://`), or a Redis Cluster (`redis+cluster://`).
//! Every call goes through [`Link::conn`]; a call that failed because its
//! connection dropped, or because its server is no longer the master,
//! calls [`Link::reset`] and the next one connects afresh (Sentinel: asks
//! the Sentinels which server is the master now).
//!
//! The connections are the `redis` crate's: `ConnectionManager` for one
//! server (it reconnects by itself), a `MultiplexedConnection` to the
//! master Sentinel names, and `ClusterConnection` (it follows `MOVED` and
//! the slot map by itself).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisFuture,
    RedisResult, TlsCertificates, Value,
};

/// What `cluster.redis_url` names. Parsed without echoing the URL (it may
/// hold passwords): errors say what is wrong, never the value.
#[derive(Clone)]
pub enum Topology {
    /// One server.
    Single(ConnectionInfo),
    /// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]`
    /// with `?sentinel_password=` (and `sentinel_username=`) when the
    /// Sentinels ask for their own; `rediss+sentinel://` for TLS to both.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        /// The master's credentials and database (its address is asked).
        node: ConnectionInfo,
        tls: bool,
    },
    /// `redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`: some of
    /// the cluster's nodes; the rest are learnt from them.
    /// `rediss+cluster://` for TLS.
    Cluster { nodes: Vec<ConnectionInfo> },
}

/// Derived from `cluster.redis_url`, which is compared itself: the
/// addresses and names decide.
impl PartialEq for Topology {
    fn eq(&self, other: &Self) -> bool {
        self.describe() == other.describe() && self.is_tls() == other.is_tls()
    }
}

/// Addresses only: the connection infos hold passwords.
impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Topology {
    pub fn parse(url: &str) -> Result<Topology, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or("is not a URL (redis://, rediss://, redis+unix://, redis+sentinel://, redis+cluster://)")?;
        let single = |url: &str| {
            url.into_connection_info()
                .map(Topology::Single)
                .map_err(|_| "is not a Redis URL".to_owned())
        };
        let (base, kind) = match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => return single(url),
            "redis+sentinel" => ("redis", "sentinel"),
            "rediss+sentinel" => ("rediss", "sentinel"),
            "redis+cluster" => ("redis", "cluster"),
            "rediss+cluster" => ("rediss", "cluster"),
            _ => {
                return Err("must start with redis://, rediss:// (TLS), redis+unix://, \
                     redis+sentinel:// or redis+cluster:// (rediss+... for TLS)"
                    .into())
            }
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
        if hosts.is_empty() {
            return Err(format!("names no {kind} node (HOST:PORT[,HOST:PORT...])"));
        }
        let node = |userinfo: &str, host: &str, db: &str| {
            format!("{base}://{userinfo}{host}/{db}")
                .as_str()
                .into_connection_info()
                .map_err(|_| format!("has a {kind} node that is not HOST:PORT"))
        };
        let mut sentinel_auth = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_password", v)) if kind == "sentinel" => sentinel_auth.1 = Some(v),
                Some(("sentinel_username", v)) if kind == "sentinel" => sentinel_auth.0 = Some(v),
                _ => {
                    return Err(format!(
                        "has a query parameter qbproxy does not know (a {kind} URL takes {})",
                        if kind == "sentinel" {
                            "sentinel_password and sentinel_username"
                        } else {
                            "none"
                        }
                    ))
                }
            }
        }
        if kind == "cluster" {
            if !path.is_empty() {
                return Err("names a database: a Redis Cluster has only database 0".into());
            }
            let nodes = hosts
                .iter()
                .map(|h| node(&userinfo, h, ""))
                .collect::<Result<_, _>>()?;
            return Ok(Topology::Cluster { nodes });
        }
        let (master, db) = path.split_once('/').unwrap_or((path, ""));
        if master.is_empty() {
            return Err("names no master: redis+sentinel://HOSTS/MASTER[/DB]".into());
        }
        if !db.is_empty() && db.parse::<u16>().is_err() {
            return Err("has a database that is not a number".into());
        }
        let sentinel_userinfo = match sentinel_auth {
            (None, None) => String::new(),
            (user, password) => format!("{}:{}@", user.unwrap_or(""), password.unwrap_or("")),
        };
        let sentinels = hosts
            .iter()
            .map(|h| node(&sentinel_userinfo, h, ""))
            .collect::<Result<_, _>>()?;
        // The master's address comes from the Sentinels; this one only
        // carries its credentials and database.
        let node = node(&userinfo, "master", db)?;
        Ok(Topology::Sentinel {
            sentinels,
            master: master.to_owned(),
            node,
            tls: base == "rediss",
        })
    }

    /// Where, for the log: addresses and the master's name, no password.
    pub fn describe(&self) -> String {
        let addrs = |infos: &[ConnectionInfo]| {
            infos
                .iter()
                .map(|i| i.addr().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Topology::Single(info) => info.addr().to_string(),
            Topology::Sentinel {
                sentinels, master, ..
            } => format!("master {master:?} of the Sentinels {}", addrs(sentinels)),
            Topology::Cluster { nodes } => format!("the Redis Cluster of {}", addrs(nodes)),
        }
    }

    /// True when connections are TLS.
    pub fn is_tls(&self) -> bool {
        match self {
            Topology::Single(info) => matches!(info.addr(), ConnectionAddr::TcpTls { .. }),
            Topology::Sentinel { tls, .. } => *tls,
            Topology::Cluster { nodes } => nodes
                .iter()
                .any(|n| matches!(n.addr(), ConnectionAddr::TcpTls { .. })),
        }
    }
}

/// `[cluster] ca_file`, `cert_file` and `key_file`, read: the CA that
/// signs the Redis servers' certificates (instead of the system's), and a
/// client certificate for servers that ask for one (`tls-auth-clients`).
#[derive(Clone, Default, PartialEq)]
pub struct RedisTls {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never the key.
impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }

    fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }
}

/// A connection calls are made on.
#[derive(Clone)]
pub enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Kind {
    Single {
        client: Client,
        manager: ConnectionManager,
    },
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster {
        client: ClusterClient,
        /// One client per node named, for the pub/sub connection: in a
        /// Redis Cluster every node hears every `PUBLISH`.
        nodes: Vec<Client>,
        next: AtomicUsize,
    },
}

pub struct Link {
    kind: Kind,
    /// Sentinel and Cluster: the connection in use, made on first use and
    /// again after [`Link::reset`].
    current: Mutex<Option<Conn>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl Link {
    /// Connects lazily: nothing is asked of Redis until the first call.
    pub fn new(topology: &Topology, tls: &RedisTls, timeout: Duration) -> RedisResult<Link> {
        if tls.is_set() && !topology.is_tls() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "ca_file, cert_file and key_file apply to TLS (rediss://) only",
            )));
        }
        let client = |info: ConnectionInfo| {
            if tls.is_set() {
                Client::build_with_tls(info, tls.certificates())
            } else {
                Client::open(info)
            }
        };
        let kind = match topology {
            Topology::Single(info) => {
                let client = client(info.clone())?;
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager)?;
                Kind::Single { client, manager }
            }
            Topology::Sentinel {
                sentinels,
                master,
                node,
                tls: on,
            } => {
                let mut builder = SentinelClientBuilder::new(
                    sentinels.iter().map(|s| s.addr().clone()),
                    master,
                    SentinelServerType::Master,
                )?
                .set_client_to_redis_db(node.redis_settings().db());
                let sentinel_auth = sentinels[0].redis_settings();
                if let Some(user) = sentinel_auth.username() {
                    builder = builder.set_client_to_sentinel_username(user);
                }
                if let Some(password) = sentinel_auth.password() {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                let auth = node.redis_settings();
                if let Some(user) = auth.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = auth.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                if *on {
                    builder = builder
                        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
                    if tls.is_set() {
                        builder = builder
                            .set_client_to_redis_certificates(tls.certificates())
                            .set_client_to_sentinel_certificates(tls.certificates());
                    }
                }
                Kind::Sentinel(tokio::sync::Mutex::new(builder.build()?))
            }
            Topology::Cluster { nodes } => {
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1);
                if tls.is_set() {
                    builder = builder.certs(tls.certificates());
                }
                Kind::Cluster {
                    client: builder.build()?,
                    nodes: nodes
                        .iter()
                        .map(|n| client(n.clone()))
                        .collect::<RedisResult<_>>()?,
                    next: AtomicUsize::new(0),
                }
            }
        };
        Ok(Link {
            kind,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            timeout,
        })
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    /// The connection to call on; connects if there is none.
    pub async fn conn(&self) -> RedisResult<Conn> {
        if let Kind::Single { manager, .. } = &self.kind {
            return Ok(Conn::Manager(manager.clone()));
        }
        if let Some(conn) = self.held() {
            return Ok(conn);
        }
        let _one = self.connecting.lock().await;
        if let Some(conn) = self.held() {
            return Ok(conn);
        }
        let conn = match &self.kind {
            Kind::Single { .. } => unreachable!("answered above"),
            Kind::Sentinel(sentinel) => Conn::Multiplexed(
                sentinel
                    .lock()
                    .await
                    .get_async_connection_with_config(&self.config())
                    .await?,
            ),
            Kind::Cluster { client, .. } => Conn::Cluster(client.get_async_connection().await?),
        };
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn held(&self) -> Option<Conn> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A call failed on a dropped connection, or reached a server that is
    /// no longer the master (`READONLY`): the next call connects afresh.
    pub fn reset(&self) {
        if matches!(self.kind, Kind::Sentinel(_)) {
            self.current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        // One server: the ConnectionManager reconnects by itself. Cluster:
        // the ClusterConnection reconnects to nodes and refreshes its slot
        // map by itself.
    }

    /// A connection for `PSUBSCRIBE`: to the server, the master, or a node
    /// of the cluster (each hears every `PUBLISH`; the next is tried on
    /// each call, so a node that is gone is passed over).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let client = match &self.kind {
            Kind::Single { client, .. } => client.clone(),
            Kind::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await?,
            Kind::Cluster { nodes, next, .. } => {
                nodes[next.fetch_add(1, Ordering::Relaxed) % nodes.len()].clone()
            }
        };
        client.get_async_pubsub().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_server_the_sentinels_or_the_cluster() {
        let Topology::Single(_) = Topology::parse("redis://:pw@10.0.0.5:6379/0").unwrap() else {
            panic!("one server")
        };
        let Topology::Sentinel {
            sentinels,
            master,
            node,
            tls,
        } = Topology::parse(
            "redis+sentinel://app:pw@s1:26379,s2:26380/qbproxy/2?sentinel_password=spw",
        )
        .unwrap()
        else {
            panic!("Sentinel")
        };
        assert_eq!(master, "qbproxy");
        assert!(!tls);
        assert_eq!(sentinels.len(), 2);
        assert_eq!(sentinels[1].addr().to_string(), "s2:26380");
        assert_eq!(sentinels[0].redis_settings().password(), Some("spw"));
        assert_eq!(node.redis_settings().username(), Some("app"));
        assert_eq!(node.redis_settings().password(), Some("pw"));
        assert_eq!(node.redis_settings().db(), 2);
        let Topology::Cluster { nodes } =
            Topology::parse("rediss+cluster://:pw@n1:7000,n2:7001").unwrap()
        else {
            panic!("cluster")
        };
        assert_eq!(nodes.len(), 2);
        assert!(matches!(nodes[0].addr(), ConnectionAddr::TcpTls { .. }));
        assert_eq!(nodes[1].redis_settings().password(), Some("pw"));
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        for url in [
            "http://:secretpw@h:1",
            "redis+sentinel://:secretpw@/qbproxy",
            "redis+sentinel://:secretpw@h:26379",
            "redis+sentinel://:secretpw@h:26379/m/x",
            "redis+cluster://:secretpw@h:7000/1",
            "redis+cluster://:secretpw@h:7000?x=1",
        ] {
            let e = Topology::parse(url)
                .err()
                .unwrap_or_else(|| panic!("{url}"));
            assert!(!e.contains("secretpw"), "{e}");
        }
        let described = Topology::parse("redis+sentinel://:secretpw@h:26379/m")
            .unwrap()
            .describe();
        assert!(!described.contains("secretpw") && described.contains("h:26379"));
    }
}
