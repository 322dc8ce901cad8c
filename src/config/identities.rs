//! `[[identity]]` and `[[pool]]`: who sessions are created for, and how
//! requests choose among them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::validate::Validator;
use super::ConfigError;
use crate::quickblox::credentials::{Command, Credentials, Secret, SecretSource};

/// One identity: its own session, renewal, backoff and expiry tracking.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub name: String,
    pub credentials: Credentials,
    /// Requests under this path prefix use this identity; the prefix is
    /// stripped before forwarding.
    pub path_prefix: Option<String>,
    /// The pool this identity belongs to, if any. Pool members get their
    /// session on first use and are set aside when QuickBlox refuses their
    /// credentials.
    pub pool: Option<PoolId>,
}

/// An identity of a validated [`Config`](super::Config): an index into
/// `Config::identities`, valid for that config only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityId(usize);

/// A pool of a validated config: an index into `Config::pools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId(usize);

impl IdentityId {
    pub fn index(self) -> usize {
        self.0
    }

    /// The identity at `index` of the config it was counted in.
    pub(crate) fn from_index(index: usize) -> IdentityId {
        IdentityId(index)
    }
}

impl PoolId {
    pub fn index(self) -> usize {
        self.0
    }

    /// The pool at `index` of the config it was counted in.
    #[cfg(test)]
    pub(crate) fn from_index(index: usize) -> PoolId {
        PoolId(index)
    }
}

/// What a request can act as: an identity or a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetId {
    Identity(IdentityId),
    Pool(PoolId),
}

/// How a pool picks a member for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each request to the next member (default).
    #[default]
    RoundRobin,
    /// The same `QBProxy-Client` header value always maps to the same member.
    Sticky,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// Its members, in order.
    pub members: Vec<IdentityId>,
    pub strategy: Strategy,
    /// Most session creations in flight at once for the pool's members.
    pub create_concurrency: usize,
    /// Most requests in flight per member; `None` is unlimited.
    pub max_in_flight: Option<usize>,
    pub path_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    name: String,
    login: Option<String>,
    email: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    provider: Option<String>,
    token: Option<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    token_command: Option<String>,
    secret: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    secret_command: Option<String>,
    project_id: Option<String>,
    access_token: Option<String>,
    access_token_env: Option<String>,
    access_token_file: Option<PathBuf>,
    access_token_command: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    command_timeout: Option<Duration>,
    command_env: Option<Vec<String>>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    on_behalf_of: Option<u64>,
    path_prefix: Option<String>,
}

impl RawIdentity {
    pub(super) fn resolve_paths(&mut self, at: &str, b: &mut super::raw::Beside<'_>) {
        b.resolve(format!("{at}.password_file"), &mut self.password_file);
        b.resolve(format!("{at}.token_file"), &mut self.token_file);
        b.resolve(format!("{at}.secret_file"), &mut self.secret_file);
        b.resolve(
            format!("{at}.access_token_file"),
            &mut self.access_token_file,
        );
        b.resolve(format!("{at}.api_key_file"), &mut self.api_key_file);
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    name: String,
    identities: Option<Vec<String>>,
    login: Option<String>,
    email: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    count: Option<usize>,
    #[serde(default = "one")]
    start: usize,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default = "default_create_concurrency")]
    create_concurrency: usize,
    max_in_flight: Option<usize>,
    path_prefix: Option<String>,
}

impl RawPool {
    pub(super) fn resolve_paths(&mut self, at: &str, b: &mut super::raw::Beside<'_>) {
        b.resolve(format!("{at}.password_file"), &mut self.password_file);
    }
}

fn one() -> usize {
    1
}

fn default_create_concurrency() -> usize {
    4
}

/// Largest generated pool: a typo in `count` should not mean a million logins.
const MAX_POOL: usize = 100_000;

/// Identities, pools, the default, and every selectable name.
pub(super) struct Resolved {
    pub identities: Vec<IdentityConfig>,
    pub pools: Vec<PoolConfig>,
    pub default: TargetId,
    pub names: HashMap<String, TargetId>,
}

impl Validator<'_> {
    pub(super) fn identities_and_pools(
        &self,
        raw_ids: Vec<RawIdentity>,
        raw_pools: Vec<RawPool>,
    ) -> Result<Resolved, ConfigError> {
        let mut names: HashMap<String, TargetId> = HashMap::new();
        let mut prefixes: HashSet<String> = HashSet::new();
        let mut identities = Vec::with_capacity(raw_ids.len());
        // A problem in one identity or pool is noted and the next checked:
        // one run reports them all (the placeholders never become a Config).
        for (i, r) in raw_ids.into_iter().enumerate() {
            let at = |field: &str| format!("identity[{i}].{field}");
            self.keep(self.name(
                &at("name"),
                &r.name,
                TargetId::Identity(IdentityId(i)),
                &mut names,
            ));
            let path_prefix = self
                .keep(self.prefix(&at("path_prefix"), r.path_prefix.as_deref(), &mut prefixes))
                .flatten();
            let name = r.name.clone();
            let credentials = self
                .keep(self.credentials(&at, r))
                .unwrap_or(Credentials::Application);
            identities.push(IdentityConfig {
                name,
                credentials,
                path_prefix,
                pool: None,
            });
        }
        let mut pools = Vec::with_capacity(raw_pools.len());
        for (i, r) in raw_pools.into_iter().enumerate() {
            let at = |field: &str| format!("pool[{i}].{field}");
            self.keep(self.name(&at("name"), &r.name, TargetId::Pool(PoolId(i)), &mut names));
            let path_prefix = self
                .keep(self.prefix(&at("path_prefix"), r.path_prefix.as_deref(), &mut prefixes))
                .flatten();
            if r.create_concurrency == 0 {
                self.note_error(self.invalid(&at("create_concurrency"), "must be at least 1"));
            }
            if r.max_in_flight == Some(0) {
                self.note_error(self.invalid(
                    &at("max_in_flight"),
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
            let members = self
                .keep(self.pool_members(&at, &r, PoolId(i), &mut identities, &mut names))
                .unwrap_or_default();
            pools.push(PoolConfig {
                name: r.name,
                members,
                strategy: r.strategy,
                create_concurrency: r.create_concurrency,
                max_in_flight: r.max_in_flight,
                path_prefix,
            });
        }
        let default = match (
            identities.iter().position(|i| i.pool.is_none()),
            pools.first(),
        ) {
            (Some(i), _) => TargetId::Identity(IdentityId(i)),
            (None, Some(_)) => TargetId::Pool(PoolId(0)),
            (None, None) => {
                let id = IdentityId(identities.len());
                identities.push(IdentityConfig {
                    name: "app".into(),
                    credentials: Credentials::Application,
                    path_prefix: None,
                    pool: None,
                });
                names.insert("app".into(), TargetId::Identity(id));
                TargetId::Identity(id)
            }
        };
        Ok(Resolved {
            identities,
            pools,
            default,
            names,
        })
    }

    fn name(
        &self,
        key: &str,
        name: &str,
        id: TargetId,
        names: &mut HashMap<String, TargetId>,
    ) -> Result<(), ConfigError> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid {
            return Err(self.invalid(
                key,
                format!("{name:?}: use letters, digits, '-', '_' or '.'"),
            ));
        }
        if names.insert(name.to_owned(), id).is_some() {
            return Err(self.invalid(
                key,
                format!("{name:?} is already the name of an identity or pool"),
            ));
        }
        Ok(())
    }

    fn prefix(
        &self,
        key: &str,
        prefix: Option<&str>,
        seen: &mut HashSet<String>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(p) = prefix else { return Ok(None) };
        let valid = p.len() > 1
            && p.starts_with('/')
            && !p.ends_with('/')
            && !p.contains(['?', '#', '%', ' '])
            && !p.contains("//");
        if !valid {
            return Err(self.invalid(
                key,
                format!("{p:?}: write it like \"/bot\" (a leading slash, no trailing one)"),
            ));
        }
        if !seen.insert(p.to_owned()) {
            return Err(self.invalid(key, format!("{p:?} is used twice")));
        }
        Ok(Some(p.to_owned()))
    }

    fn credentials(
        &self,
        at: &dyn Fn(&str) -> String,
        r: RawIdentity,
    ) -> Result<Credentials, ConfigError> {
        let timeout = match &r.command_timeout {
            Some(t) => self.positive(&at("command_timeout"), *t)?,
            None => Duration::from_secs(10),
        };
        let has_command = r.token_command.is_some()
            || r.secret_command.is_some()
            || r.access_token_command.is_some();
        let env = match &r.command_env {
            Some(_) if !has_command => {
                return Err(self.invalid(
                    &at("command_env"),
                    "only with token_command, secret_command or access_token_command",
                ))
            }
            Some(names) => {
                let bad = names.iter().find(|n| {
                    n.is_empty()
                        || n.starts_with(|c: char| c.is_ascii_digit())
                        || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
                if let Some(bad) = bad {
                    return Err(self.invalid(
                        &at("command_env"),
                        format!("{bad:?} is not an environment variable name"),
                    ));
                }
                names.clone()
            }
            None => Vec::new(),
        };
        if has_command {
            self.note_command();
        }
        let provider_fields = [
            (
                "token",
                r.token.is_some()
                    || r.token_env.is_some()
                    || r.token_file.is_some()
                    || r.token_command.is_some(),
            ),
            (
                "secret",
                r.secret.is_some()
                    || r.secret_env.is_some()
                    || r.secret_file.is_some()
                    || r.secret_command.is_some(),
            ),
            ("project_id", r.project_id.is_some()),
            (
                "access_token",
                r.access_token.is_some()
                    || r.access_token_env.is_some()
                    || r.access_token_file.is_some()
                    || r.access_token_command.is_some(),
            ),
        ];
        let user_fields = [
            ("login", r.login.is_some()),
            ("email", r.email.is_some()),
            (
                "password",
                r.password.is_some() || r.password_env.is_some() || r.password_file.is_some(),
            ),
        ];
        let refuse = |fields: &[(&str, bool)], why: &str| -> Result<(), ConfigError> {
            match fields.iter().find(|(_, set)| *set) {
                Some((field, _)) => Err(self.invalid(&at(field), why.to_owned())),
                None => Ok(()),
            }
        };
        let api_key_given =
            r.api_key.is_some() || r.api_key_env.is_some() || r.api_key_file.is_some();
        if api_key_given {
            let why = "not used with an API key (an api_key identity sends the key, it creates no session)";
            refuse(&user_fields, why)?;
            refuse(&provider_fields, why)?;
            refuse(&[("provider", r.provider.is_some())], why)?;
            let key = self
                .secret(&at("api_key"), r.api_key, r.api_key_env, r.api_key_file)?
                .ok_or_else(|| self.invalid(&at("api_key"), "missing"))?;
            // It goes into a header: `Authorization: ApiKey <key>`. The
            // message names what is wrong, never the key.
            if !key.expose().bytes().all(|b| b.is_ascii_graphic()) {
                return Err(self.invalid(
                    &at("api_key"),
                    "holds a space or a character that cannot go in a header; QuickBlox's keys are printable ASCII",
                ));
            }
            if r.on_behalf_of == Some(0) {
                return Err(self.invalid(&at("on_behalf_of"), "must be a QuickBlox user id (1 or more); leave it out to act as the application"));
            }
            return Ok(Credentials::ApiKey {
                key,
                on_behalf_of: r.on_behalf_of,
            });
        }
        if r.on_behalf_of.is_some() {
            return Err(self.invalid(
                &at("on_behalf_of"),
                "only with api_key, api_key_env or api_key_file",
            ));
        }
        match r.provider.as_deref() {
            None => {
                refuse(&provider_fields, "only for provider = \"facebook\" or \"firebase_phone\"")?;
                let password = self.secret(&at("password"), r.password, r.password_env, r.password_file)?;
                self.user_credentials(at, r.login, r.email, password)
            }
            Some("facebook") => {
                refuse(&user_fields, "not used with provider = \"facebook\"")?;
                refuse(&provider_fields[2..], "not used with provider = \"facebook\"")?;
                let token = self
                    .source(&at("token"), r.token, r.token_env, r.token_file, r.token_command, timeout, &env)?
                    .ok_or_else(|| self.invalid(&at("token"), "missing: set token, token_env, token_file or token_command"))?;
                let secret = self.source(&at("secret"), r.secret, r.secret_env, r.secret_file, r.secret_command, timeout, &env)?;
                Ok(Credentials::Facebook { token, secret })
            }
            Some("firebase_phone") => {
                refuse(&user_fields, "not used with provider = \"firebase_phone\"")?;
                refuse(&provider_fields[..2], "not used with provider = \"firebase_phone\"")?;
                let project_id = r
                    .project_id
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| self.invalid(&at("project_id"), "missing: the Firebase project id"))?;
                let access_token = self
                    .source(
                        &at("access_token"),
                        r.access_token,
                        r.access_token_env,
                        r.access_token_file,
                        r.access_token_command,
                        timeout,
                        &env,
                    )?
                    .ok_or_else(|| {
                        self.invalid(
                            &at("access_token"),
                            "missing: set access_token, access_token_env, access_token_file or access_token_command",
                        )
                    })?;
                Ok(Credentials::FirebasePhone { project_id, access_token })
            }
            Some(other) => Err(self.invalid(
                &at("provider"),
                format!("{other:?} is not supported; use \"facebook\" or \"firebase_phone\", or login/email with a password"),
            )),
        }
    }

    fn user_credentials(
        &self,
        at: &dyn Fn(&str) -> String,
        login: Option<String>,
        email: Option<String>,
        password: Option<Secret>,
    ) -> Result<Credentials, ConfigError> {
        match (login, email, password) {
            (None, None, None) => Ok(Credentials::Application),
            (None, None, Some(_)) => Err(self.invalid(
                &at("password"),
                "a password needs a login or an email; without both, the identity is an application session",
            )),
            (Some(_), Some(_), _) => Err(self.invalid(&at("login"), "set login or email, not both")),
            (Some(_), None, None) | (None, Some(_), None) => Err(self.invalid(
                &at("password"),
                "missing: set one of password, password_env or password_file",
            )),
            (Some(login), None, Some(password)) => Ok(Credentials::Login { login, password }),
            (None, Some(email), Some(password)) => Ok(Credentials::Email { email, password }),
        }
    }

    /// A token read afresh at each session creation. An environment
    /// variable must exist already (it cannot appear later); a file or a
    /// command is only tried when a session is created.
    #[allow(clippy::too_many_arguments)]
    fn source(
        &self,
        key: &str,
        inline: Option<String>,
        env: Option<String>,
        file: Option<PathBuf>,
        command: Option<String>,
        timeout: Duration,
        command_env: &[String],
    ) -> Result<Option<SecretSource>, ConfigError> {
        let given = [
            inline.is_some(),
            env.is_some(),
            file.is_some(),
            command.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(self.invalid(
                key,
                format!("set only one of {key}, {key}_env, {key}_file, {key}_command"),
            ));
        }
        Ok(if let Some(s) = inline {
            Some(SecretSource::Inline(Secret::new(s)))
        } else if let Some(var) = env {
            if std::env::var_os(&var).is_none() {
                return Err(self.invalid(
                    &format!("{key}_env"),
                    format!("environment variable {var} is not set"),
                ));
            }
            Some(SecretSource::Env(var))
        } else if let Some(path) = file {
            self.note_secret_file(&format!("{key}_file"), &path);
            Some(SecretSource::File(path))
        } else {
            command.map(|command| {
                SecretSource::Command(Command {
                    command,
                    timeout,
                    env: command_env.to_vec(),
                })
            })
        })
    }

    /// A pool's members: named identities, or a generated range appended to
    /// `identities` as `{pool}-{n}`.
    fn pool_members(
        &self,
        at: &dyn Fn(&str) -> String,
        r: &RawPool,
        pool: PoolId,
        identities: &mut Vec<IdentityConfig>,
        names: &mut HashMap<String, TargetId>,
    ) -> Result<Vec<IdentityId>, ConfigError> {
        let generated = r.login.is_some() || r.email.is_some() || r.count.is_some();
        match (&r.identities, generated) {
            (Some(_), true) => Err(self.invalid(&at("identities"), "list identities or generate members (login/email + count), not both")),
            (None, false) => Err(self.invalid(
                &at("identities"),
                "missing: list identities = [...], or generate members with login = \"name-{n}\" and count",
            )),
            (Some(list), false) => {
                if list.is_empty() {
                    return Err(self.invalid(&at("identities"), "must not be empty"));
                }
                let mut members = Vec::with_capacity(list.len());
                for name in list {
                    let Some(TargetId::Identity(member)) = names.get(name).copied() else {
                        return Err(self.invalid(&at("identities"), format!("no [[identity]] is named {name:?}")));
                    };
                    if identities[member.0].pool.is_some() {
                        return Err(self.invalid(&at("identities"), format!("{name:?} is already in another pool")));
                    }
                    identities[member.0].pool = Some(pool);
                    members.push(member);
                }
                Ok(members)
            }
            (None, true) => {
                let count = r.count.ok_or_else(|| self.invalid(&at("count"), "missing: how many members to generate"))?;
                if count == 0 || count > MAX_POOL {
                    return Err(self.invalid(&at("count"), format!("must be between 1 and {MAX_POOL}")));
                }
                let (field, pattern) = match (&r.login, &r.email) {
                    (Some(l), None) => ("login", l),
                    (None, Some(e)) => ("email", e),
                    _ => return Err(self.invalid(&at("login"), "set login or email (with {n}), not both")),
                };
                if !pattern.contains("{n}") {
                    return Err(self.invalid(&at(field), format!("{pattern:?} needs {{n}}, replaced by the member number")));
                }
                let password = self
                    .secret(&at("password"), r.password.clone(), r.password_env.clone(), r.password_file.clone())?
                    .ok_or_else(|| self.invalid(&at("password"), "missing: set password, password_env or password_file"))?;
                if count > 1 && !password.expose().contains("{n}") {
                    // Often a mistake (users made for a load test have
                    // numbered passwords), sometimes not: warn, and the probe
                    // tries the last member too.
                    self.note_warning(format!(
                        "{}: the {field} pattern {pattern:?} numbers each member but the password has no {{n}}: \
                         all {count} members log in with the same password",
                        at("password")
                    ));
                }
                let mut members = Vec::with_capacity(count);
                for n in r.start..r.start + count {
                    let name = format!("{}-{n}", r.name);
                    let member = IdentityId(identities.len());
                    if names.insert(name.clone(), TargetId::Identity(member)).is_some() {
                        return Err(self.invalid(&at("name"), format!("generated member {name:?} clashes with another name")));
                    }
                    let who = pattern.replace("{n}", &n.to_string());
                    // `{n}` in the password too, for test users with numbered passwords.
                    let password = Secret::new(password.expose().replace("{n}", &n.to_string()));
                    let credentials = if field == "login" {
                        Credentials::Login { login: who, password }
                    } else {
                        Credentials::Email { email: who, password }
                    };
                    identities.push(IdentityConfig {
                        name,
                        credentials,
                        path_prefix: None,
                        pool: Some(pool),
                    });
                    members.push(member);
                }
                Ok(members)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Strategy};
    use crate::quickblox::credentials::{Credentials, SecretSource};

    const APP: &str = "[quickblox]\napplication_id = 1\nauth_key = \"k\"\nauth_secret = \"s\"\n";

    #[test]
    fn a_pool_numbering_logins_but_not_passwords_is_warned_about() {
        let numbered =
            "[[pool]]\nname = \"load\"\nlogin = \"u-{n}\"\npassword = \"pw-{n}\"\ncount = 3\n";
        assert!(parse(numbered).unwrap().warnings.is_empty());
        let same = "[[pool]]\nname = \"load\"\nlogin = \"u-{n}\"\npassword = \"pw\"\ncount = 3\n";
        let warnings = parse(same).unwrap().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0]
                .starts_with("pool[0].password: the login pattern \"u-{n}\" numbers each member")
                && warnings[0].contains("all 3 members log in with the same password")
                && !warnings[0].contains("pw"),
            "{}",
            warnings[0]
        );
    }

    fn parse(extra: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{APP}{extra}"), Path::new("t.toml")).map_err(|e| e.to_string())
    }

    fn problem(extra: &str) -> String {
        let e = parse(extra).unwrap_err();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn api_key_identities_are_checked_and_never_shown() {
        let c = parse(
            "[[identity]]\nname = \"svc\"\napi_key = \"k-123\"\non_behalf_of = 42\n\
             [[identity]]\nname = \"app\"\napi_key = \"k-456\"\n",
        )
        .unwrap();
        match &c.identities[0].credentials {
            Credentials::ApiKey { key, on_behalf_of } => {
                assert_eq!(key.expose(), "k-123");
                assert_eq!(*on_behalf_of, Some(42));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.identities[1].credentials.kind().as_str(), "api_key");
        for (extra, says) in [
            (
                "name = \"x\"\napi_key = \"k\"\nlogin = \"l\"\n",
                "identity[0].login: not used with an API key",
            ),
            (
                "name = \"x\"\napi_key = \"k\"\nprovider = \"facebook\"\n",
                "identity[0].provider: not used with an API key",
            ),
            (
                "name = \"x\"\napi_key = \"k\"\napi_key_env = \"K\"\n",
                "identity[0].api_key: set only one of",
            ),
            (
                "name = \"x\"\napi_key_env = \"QBPROXY_TEST_SURELY_UNSET_KEY\"\n",
                "identity[0].api_key_env: environment variable QBPROXY_TEST_SURELY_UNSET_KEY is not set",
            ),
            (
                "name = \"x\"\napi_key = \"k\"\non_behalf_of = 0\n",
                "identity[0].on_behalf_of: must be a QuickBlox user id",
            ),
            (
                "name = \"x\"\nlogin = \"l\"\npassword = \"p\"\non_behalf_of = 5\n",
                "identity[0].on_behalf_of: only with api_key",
            ),
            (
                "name = \"x\"\napi_key = \"secret key\"\n",
                "identity[0].api_key: holds a space",
            ),
        ] {
            let e = problem(&format!("[[identity]]\n{extra}"));
            assert!(e.contains(says), "{extra}: {e}");
            assert!(!e.contains("secret key"), "the key is never shown: {e}");
        }
        // Its Debug never shows the key.
        assert!(!format!("{:?}", c.identities[0]).contains("k-123"));
    }

    #[test]
    fn provider_identities() {
        let c = parse(
            "[[identity]]\nname = \"fb\"\nprovider = \"facebook\"\ntoken_command = \"get-token\"\nsecret = \"x\"\n\
             [[identity]]\nname = \"ph\"\nprovider = \"firebase_phone\"\nproject_id = \"p\"\naccess_token_file = \"/run/t\"\n",
        )
        .unwrap();
        match &c.identities[0].credentials {
            Credentials::Facebook {
                token: SecretSource::Command(c),
                secret: Some(_),
            } => {
                assert_eq!(c.command, "get-token")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.identities[1].credentials.kind().as_str(),
            "firebase_phone"
        );
        for (extra, key) in [
            (
                "name = \"x\"\nprovider = \"twitter\"\n",
                "identity[0].provider",
            ),
            (
                "name = \"x\"\nprovider = \"facebook\"\n",
                "identity[0].token: missing",
            ),
            (
                "name = \"x\"\nprovider = \"facebook\"\ntoken = \"t\"\nlogin = \"l\"\n",
                "identity[0].login",
            ),
            (
                "name = \"x\"\nprovider = \"firebase_phone\"\naccess_token = \"t\"\n",
                "identity[0].project_id",
            ),
            (
                "name = \"x\"\nlogin = \"l\"\npassword = \"p\"\ntoken = \"t\"\n",
                "identity[0].token",
            ),
            (
                "name = \"x\"\nprovider = \"facebook\"\ntoken = \"t\"\ntoken_command = \"c\"\n",
                "identity[0].token",
            ),
            (
                "name = \"x\"\nprovider = \"facebook\"\ntoken_env = \"QBPROXY_SURELY_UNSET\"\n",
                "identity[0].token_env",
            ),
            (
                "name = \"x\"\npath_prefix = \"bot\"\n",
                "identity[0].path_prefix",
            ),
            (
                "name = \"x\"\npath_prefix = \"/bot/\"\n",
                "identity[0].path_prefix",
            ),
        ] {
            let e = problem(&format!("[[identity]]\n{extra}"));
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn generated_pool() {
        let c = parse(
            "[[identity]]\nname = \"bot\"\nlogin = \"bot\"\npassword = \"p\"\n\
             [[pool]]\nname = \"load\"\nlogin = \"lt-{n}\"\ncount = 3\nstart = 10\npassword = \"pw-{n}\"\nstrategy = \"sticky\"\n",
        )
        .unwrap();
        assert_eq!(c.target_name(c.default), "bot");
        let pool = &c.pools[0];
        let members: Vec<&str> = pool
            .members
            .iter()
            .map(|m| c.identity(*m).name.as_str())
            .collect();
        assert_eq!(members, ["load-10", "load-11", "load-12"]);
        assert_eq!(pool.strategy, Strategy::Sticky);
        assert_eq!(pool.create_concurrency, 4);
        assert_eq!(pool.max_in_flight, None);
        let m = c.identities.iter().find(|i| i.name == "load-11").unwrap();
        assert_eq!(m.pool.map(|p| c.pool(p).name.as_str()), Some("load"));
        match &m.credentials {
            Credentials::Login { login, password } => {
                assert_eq!(login, "lt-11");
                assert_eq!(password.expose(), "pw-11");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pool_alone_is_the_default() {
        let c = parse(
            "[[pool]]\nname = \"load\"\nemail = \"u{n}@x.io\"\ncount = 2\npassword = \"p\"\n",
        )
        .unwrap();
        assert_eq!(c.target_name(c.default), "load");
        assert_eq!(c.identities.len(), 2);
    }

    #[test]
    fn pool_mistakes_name_their_key() {
        let ids = "[[identity]]\nname = \"a\"\nlogin = \"a\"\npassword = \"p\"\n";
        for (pool, key) in [
            ("name = \"p\"\n", "pool[0].identities: missing"),
            (
                "name = \"p\"\nidentities = [\"zz\"]\n",
                "pool[0].identities",
            ),
            (
                "name = \"p\"\nidentities = [\"a\"]\nlogin = \"x-{n}\"\ncount = 1\n",
                "pool[0].identities",
            ),
            (
                "name = \"p\"\nlogin = \"x\"\ncount = 2\npassword = \"p\"\n",
                "pool[0].login",
            ),
            (
                "name = \"p\"\nlogin = \"x-{n}\"\ncount = 0\npassword = \"p\"\n",
                "pool[0].count",
            ),
            (
                "name = \"p\"\nlogin = \"x-{n}\"\ncount = 2\n",
                "pool[0].password",
            ),
            (
                "name = \"a\"\nlogin = \"x-{n}\"\ncount = 2\npassword = \"p\"\n",
                "pool[0].name",
            ),
            (
                "name = \"p\"\nidentities = [\"a\"]\ncreate_concurrency = 0\n",
                "pool[0].create_concurrency",
            ),
            (
                "name = \"p\"\nidentities = [\"a\"]\nmax_in_flight = 0\n",
                "pool[0].max_in_flight",
            ),
            (
                "name = \"p\"\nidentities = [\"a\"]\nstrategy = \"random\"\n",
                "pool[0].strategy",
            ),
        ] {
            let e = problem(&format!("{ids}[[pool]]\n{pool}"));
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = problem(&format!(
            "{ids}[[pool]]\nname = \"p\"\nidentities = [\"a\"]\n[[pool]]\nname = \"q\"\nidentities = [\"a\"]\n"
        ));
        assert!(e.contains("already in another pool"), "{e}");
        let e = problem(&format!(
            "{ids}[[identity]]\nname = \"p-1\"\n[[pool]]\nname = \"p\"\nlogin = \"x-{{n}}\"\ncount = 2\npassword = \"p\"\n"
        ));
        assert!(e.contains("clashes"), "{e}");
    }
}
