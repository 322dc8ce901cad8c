//! Why no session could be had.

use std::sync::Arc;
use std::time::Duration;

/// Why session creation failed. Shown to clients after
/// `qbproxy: could not create a QuickBlox session: `, so it never contains a
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("QuickBlox is unreachable: {0}")]
    Unreachable(String),
    #[error("QuickBlox did not answer within {0:?}")]
    Timeout(Duration),
    /// `hint`: what to check, for the log and `check` (never a client's
    /// answer: it names configured values).
    #[error("{message} (HTTP {status})")]
    Refused {
        status: u16,
        message: String,
        hint: Option<String>,
    },
    #[error("unexpected answer from QuickBlox: {0}")]
    BadResponse(String),
    /// The identity's own credentials could not be read (a token command
    /// failed, a token file is missing).
    #[error("{0}")]
    Credentials(String),
}

impl SessionError {
    /// What to check, when qbproxy can say more than QuickBlox did.
    pub fn hint(&self) -> Option<&str> {
        match self {
            SessionError::Refused { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }

    /// QuickBlox refused the identity's credentials (401 Unauthorized):
    /// retrying the same ones will not help.
    pub fn credentials_refused(&self) -> bool {
        matches!(self, SessionError::Refused { status: 401, .. })
    }

    /// A failure the next attempt may not meet: QuickBlox unreachable,
    /// slow, rate limiting or failing. Refused credentials or signatures,
    /// answers qbproxy cannot read and unreadable credentials are not.
    pub fn transient(&self) -> bool {
        match self {
            SessionError::Unreachable(_) | SessionError::Timeout(_) => true,
            SessionError::Refused { status, .. } => *status == 429 || *status >= 500,
            SessionError::BadResponse(_) | SessionError::Credentials(_) => false,
        }
    }
}

/// Why no session could be handed out.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// The last creation attempt failed; retries continue in the background.
    Failed(Arc<SessionError>),
    /// The request's deadline passed while a session was being created.
    TimedOut,
}
