//! Who a session is created for, and the secrets that prove it.
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
#[derive(Clone, PartialEq, Eq)]
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
    /// Run with `sh -c`; stdout, trimmed, is the token.
    Command {
        command: String,
        timeout: Duration,
    },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
            SecretSource::Env(var) => write!(f, "Env({var})"),
            SecretSource::File(path) => write!(f, "File({})", path.display()),
            SecretSource::Command { timeout, .. } => write!(f, "Command([redacted], {timeout:?})"),
        }
    }
}

impl SecretSource {
    /// Reads the current value. The error says where it failed, never what
    /// was read.
    pub async fn read(&self) -> Result<Secret, String> {
        let value = match self {
            SecretSource::Inline(s) => return Ok(s.clone()),
            SecretSource::Env(var) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
            }
            SecretSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            SecretSource::Command { command, timeout } => run(command, *timeout).await?,
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{} gave an empty value", self.describe()));
        }
        Ok(Secret(value.to_owned()))
    }

    /// Where the value comes from, for messages.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Inline(_) => "the inline value".into(),
            SecretSource::Env(var) => format!("environment variable {var}"),
            SecretSource::File(path) => format!("file {}", path.display()),
            SecretSource::Command { command, .. } => format!("command `{}`", program(command)),
        }
    }
}

/// The command's first word: enough to recognise it in a message without
/// showing arguments that may carry credentials.
fn program(command: &str) -> &str {
    command.split_whitespace().next().unwrap_or("")
}

async fn run(command: &str, timeout: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        // Its own process group, so that everything it starts can be killed.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run command `{}`: {e}", program(command)))?;
    let _group = child.id().map(ProcessGroup);
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "command `{}` did not finish within {timeout:?}",
                program(command)
            )
        })?
        .map_err(|e| format!("command `{}` failed: {e}", program(command)))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(format!(
            "command `{}` exited with {}: {first}",
            program(command),
            output.status
        ));
    }
    String::from_utf8(output.stdout)
        .map_err(|_| format!("command `{}` printed non-UTF-8", program(command)))
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
}

impl Credentials {
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::Application => "application",
            Credentials::Login { .. } => "login",
            Credentials::Email { .. } => "email",
            Credentials::Facebook { .. } => "facebook",
            Credentials::FirebasePhone { .. } => "firebase_phone",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cmd = SecretSource::Command {
            command: "printf ' tok-1\\n'".into(),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(cmd.read().await.unwrap().expose(), "tok-1");
    }

    #[tokio::test]
    async fn failures_say_where_without_showing_values() {
        let fail = SecretSource::Command {
            command: "echo token-abc; echo broke >&2; exit 3".into(),
            timeout: Duration::from_secs(5),
        };
        let e = fail.read().await.unwrap_err();
        assert!(e.contains("exited with exit status: 3: broke"), "{e}");
        assert!(!e.contains("token-abc"));
        let slow = SecretSource::Command {
            command: "sleep 5".into(),
            timeout: Duration::from_millis(100),
        };
        assert!(slow
            .read()
            .await
            .unwrap_err()
            .contains("did not finish within 100ms"));
        // Nothing it started is left running: the marker file never appears.
        let marker = std::env::temp_dir().join(format!("qbproxy-pgkill-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let leaky = SecretSource::Command {
            command: format!("(sleep 1; touch {}) & sleep 5", marker.display()),
            timeout: Duration::from_millis(100),
        };
        assert!(leaky.read().await.is_err());
        let sentinel = SecretSource::Command {
            command: "sleep 1.5; echo done".into(),
            timeout: Duration::from_secs(5),
        };
        assert_eq!(sentinel.read().await.unwrap().expose(), "done");
        assert!(
            !marker.exists(),
            "the timed-out command's background job still ran"
        );
        let empty = SecretSource::Command {
            command: "true".into(),
            timeout: Duration::from_secs(5),
        };
        assert!(empty.read().await.unwrap_err().contains("empty value"));
        let missing = SecretSource::Env("QBPROXY_TEST_SURELY_UNSET_VAR".into());
        assert!(missing.read().await.unwrap_err().contains("is not set"));
    }
}
