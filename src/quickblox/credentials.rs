//! Who a session is created for, and the secrets that prove it (or the
//! API key that stands in for a session).
//!
//! Passwords are resolved once, when the config is loaded. Social-provider
//! tokens (Facebook, Firebase) expire on their own, so they are kept as a
//! [`SecretSource`] and read afresh for every session creation: from the
//! environment, a file, or a command's stdout (with a timeout).

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// A credential read from the config, the environment, a file or a command.
/// Its `Debug` never shows the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself; call sites are the signer and the session request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where a short-lived token is read from at each session creation.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(Secret),
    Env(String),
    File(PathBuf),
    /// Run with `sh -c` in a minimal environment; stdout, trimmed, is the
    /// token.
    Command(Command),
}

/// A token command and how it is run.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    pub command: String,
    pub timeout: Duration,
    /// Environment variables passed on to it besides `PATH` and `HOME`
    /// (`command_env`). Nothing else is: not the auth secret, not the
    /// passwords, not the client keys qbproxy was started with.
    pub env: Vec<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSource::Env(var) => write!(f, "Env({var})"),
            SecretSource::File(path) => write!(f, "File({})", path.display()),
            SecretSource::Command(c) => write!(f, "Command([redacted], {:?})", c.timeout),
        }
    }
}

/// Why a token could not be read. Its text is what a client may see (in a
/// 503's message, in `/sessions`): it says which kind of source failed and
/// how, never a path, a command line, the command's output or a value.
/// The details go to the log when the failure happens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("the token's environment variable is not set")]
    EnvNotSet,
    #[error("the token file cannot be read")]
    FileUnreadable,
    #[error("the token command could not be started")]
    CommandNotStarted,
    #[error("token command timed out after {0:?}")]
    CommandTimeout(Duration),
    #[error("token command failed ({})", exit(*.0))]
    CommandFailed(Option<i32>),
    #[error("the token command printed something that is not UTF-8")]
    NotUtf8,
    #[error("the token source gave an empty value")]
    Empty,
}

fn exit(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit {c}"),
        None => "killed by a signal".into(),
    }
}

impl SecretSource {
    /// Reads the current value. A failure is logged with its details (the
    /// first line of a command's stderr, the path, the I/O error); the
    /// error returned carries none of them.
    pub async fn read(&self) -> Result<Secret, SourceError> {
        let value = match self {
            SecretSource::Inline(s) => return Ok(s.clone()),
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                tracing::warn!(variable = %var, "token source: environment variable not set");
                SourceError::EnvNotSet
            })?,
            SecretSource::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| {
                tracing::warn!(file = %path.display(), error = %e, "token source: cannot read the file");
                SourceError::FileUnreadable
            })?,
            SecretSource::Command(c) => run(c).await?,
        };
        let value = value.trim();
        if value.is_empty() {
            tracing::warn!(source = %self.describe(), "token source gave an empty value");
            return Err(SourceError::Empty);
        }
        Ok(Secret(value.to_owned()))
    }

    /// Where the value comes from, for the log (not for clients).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Inline(_) => "the inline value".into(),
            SecretSource::Env(var) => format!("environment variable {var}"),
            SecretSource::File(path) => format!("file {}", path.display()),
            SecretSource::Command(c) => format!("command `{}`", program(&c.command)),
        }
    }
}

/// The command's first word: enough to recognise it in a log line without
/// showing arguments that may carry credentials.
fn program(command: &str) -> &str {
    command.split_whitespace().next().unwrap_or("")
}

/// The `PATH` a command gets when qbproxy has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

async fn run(c: &Command) -> Result<String, SourceError> {
    let name = program(&c.command);
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(&c.command).env_clear().env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
    );
    for var in std::iter::once("HOME").chain(c.env.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    let child = cmd
        // Its own process group, so that everything it starts can be killed.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            tracing::warn!(command = name, error = %e, "token command could not be started");
            SourceError::CommandNotStarted
        })?;
    let _group = child.id().map(ProcessGroup);
    let output = match tokio::time::timeout(c.timeout, child.wait_with_output()).await {
        Err(_) => {
            tracing::warn!(command = name, timeout = ?c.timeout, "token command timed out");
            return Err(SourceError::CommandTimeout(c.timeout));
        }
        Ok(Err(e)) => {
            tracing::warn!(command = name, error = %e, "token command could not be waited for");
            return Err(SourceError::CommandNotStarted);
        }
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        // Only the log sees what it printed, cut to a line: stderr may
        // echo credentials.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first: String = stderr
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        tracing::warn!(command = name, status = %output.status, stderr = %first, "token command failed");
        return Err(SourceError::CommandFailed(output.status.code()));
    }
    String::from_utf8(output.stdout).map_err(|_| {
        tracing::warn!(command = name, "token command printed non-UTF-8");
        SourceError::NotUtf8
    })
}

/// Kills a command's whole process group when dropped: on timeout, when the
/// session creation is cancelled, and after a normal exit (a token command
/// has no business leaving processes behind). Killing only the `sh` would
/// leave what it started running.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(id) = i32::try_from(self.0) {
            // ESRCH (nothing left in the group) is the usual, fine outcome.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(id),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Who a session is created for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// An application session: read-only in QuickBlox.
    Application,
    Login {
        login: String,
        password: Secret,
    },
    Email {
        email: String,
        password: Secret,
    },
    Facebook {
        token: SecretSource,
        secret: Option<SecretSource>,
    },
    FirebasePhone {
        project_id: String,
        access_token: SecretSource,
    },
    /// A QuickBlox API key: sent as `Authorization: ApiKey <key>` on every
    /// request, with `On-Behalf-Of: <user id>` when set. There is no
    /// session: nothing is created, nothing expires.
    ApiKey {
        key: Secret,
        on_behalf_of: Option<u64>,
    },
}

/// The kinds of identity, for logs, metrics, the admin API and reloads
/// (an identity whose kind changes is a new identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// An application session: read-only in QuickBlox.
    Application,
    Login,
    Email,
    Facebook,
    FirebasePhone,
    ApiKey,
}

impl IdentityKind {
    /// As the config and the admin API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Application => "application",
            IdentityKind::Login => "login",
            IdentityKind::Email => "email",
            IdentityKind::Facebook => "facebook",
            IdentityKind::FirebasePhone => "firebase_phone",
            IdentityKind::ApiKey => "api_key",
        }
    }
}

impl Credentials {
    pub fn kind(&self) -> IdentityKind {
        match self {
            Credentials::Application => IdentityKind::Application,
            Credentials::Login { .. } => IdentityKind::Login,
            Credentials::Email { .. } => IdentityKind::Email,
            Credentials::Facebook { .. } => IdentityKind::Facebook,
            Credentials::FirebasePhone { .. } => IdentityKind::FirebasePhone,
            Credentials::ApiKey { .. } => IdentityKind::ApiKey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(command: &str, timeout: Duration) -> SecretSource {
        SecretSource::Command(Command {
            command: command.into(),
            timeout,
            env: Vec::new(),
        })
    }

    #[tokio::test]
    async fn sources_read_the_current_value() {
        assert_eq!(
            SecretSource::Inline(Secret::new("x"))
                .read()
                .await
                .unwrap()
                .expose(),
            "x"
        );
        let cmd = command("printf ' tok-1\\n'", Duration::from_secs(5));
        assert_eq!(cmd.read().await.unwrap().expose(), "tok-1");
    }

    #[tokio::test]
    async fn failures_say_what_failed_without_output_or_values() {
        let fail = command(
            "echo token-abc; echo broke password=hunter2 >&2; exit 3",
            Duration::from_secs(5),
        );
        let e = fail.read().await.unwrap_err();
        assert_eq!(e, SourceError::CommandFailed(Some(3)));
        assert_eq!(e.to_string(), "token command failed (exit 3)");
        let slow = command("sleep 5", Duration::from_millis(100));
        assert_eq!(
            slow.read().await.unwrap_err().to_string(),
            "token command timed out after 100ms"
        );
        // Nothing it started is left running: the marker file never appears.
        let marker = std::env::temp_dir().join(format!("qbproxy-pgkill-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let leaky = command(
            &format!("(sleep 1; touch {}) & sleep 5", marker.display()),
            Duration::from_millis(100),
        );
        assert!(leaky.read().await.is_err());
        let sentinel = command("sleep 1.5; echo done", Duration::from_secs(5));
        assert_eq!(sentinel.read().await.unwrap().expose(), "done");
        assert!(
            !marker.exists(),
            "the timed-out command's background job still ran"
        );
        assert_eq!(
            command("true", Duration::from_secs(5))
                .read()
                .await
                .unwrap_err(),
            SourceError::Empty
        );
        let missing = SecretSource::Env("QBPROXY_TEST_SURELY_UNSET_VAR".into());
        assert_eq!(missing.read().await.unwrap_err(), SourceError::EnvNotSet);
        let file = SecretSource::File("/nonexistent/qbproxy/token".into());
        let e = file.read().await.unwrap_err();
        assert!(!e.to_string().contains("nonexistent"), "{e}");
    }

    #[tokio::test]
    async fn commands_see_path_home_and_command_env_only() {
        // Set for this process; the command must not see it unless listed.
        std::env::set_var("QBPROXY_TEST_SECRETISH", "leak");
        std::env::set_var("QBPROXY_TEST_PASSED", "passed");
        let cmd = SecretSource::Command(Command {
            command: "env | cut -d= -f1 | sort | tr '\\n' ' '".into(),
            timeout: Duration::from_secs(5),
            env: vec!["QBPROXY_TEST_PASSED".into()],
        });
        let names = cmd.read().await.unwrap().expose().to_owned();
        let names: Vec<&str> = names.split_whitespace().collect();
        assert!(names.contains(&"PATH"), "{names:?}");
        assert!(names.contains(&"QBPROXY_TEST_PASSED"), "{names:?}");
        assert!(!names.contains(&"QBPROXY_TEST_SECRETISH"), "{names:?}");
        let allowed = [
            "PATH",
            "HOME",
            "QBPROXY_TEST_PASSED",
            "PWD",
            "SHLVL",
            "_",
            "OLDPWD",
        ];
        assert!(names.iter().all(|n| allowed.contains(n)), "{names:?}");
    }
}
