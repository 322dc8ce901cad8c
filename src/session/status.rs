//! What the admin API shows of an identity.

use std::time::SystemTime;

use crate::quickblox::credentials::IdentityKind;

use super::Reason;

/// What the admin API shows of an identity.
#[derive(Debug, Clone)]
pub struct Status {
    pub name: String,
    pub pool: Option<String>,
    pub kind: IdentityKind,
    pub state: SessionState,
    pub session: Option<SessionStatus>,
    /// Sessions created, by reason, in the order of [`Reason::ALL`].
    pub renewals: [u64; Reason::ALL.len()],
    pub last_error: Option<String>,
}

/// Where an identity stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// A pool member not used yet: its renewal task has not started.
    Idle,
    /// The first session is being created.
    Creating,
    Ready,
    /// A session is held and works, but the last renewal attempt failed.
    ReadyRenewalFailing,
    /// No session; the last attempt failed and a retry is scheduled.
    Failing,
    /// A pool member whose credentials QuickBlox refused: nothing is
    /// retried until a forced renewal.
    SetAside,
}

impl SessionState {
    /// As the admin API and the docs write it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::Creating => "creating",
            SessionState::Ready => "ready",
            SessionState::ReadyRenewalFailing => "ready_renewal_failing",
            SessionState::Failing => "failing",
            SessionState::SetAside => "set_aside",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionStatus {
    pub user_id: u64,
    /// A prefix only.
    pub token: String,
    pub generation: u64,
    /// Its fleet generation; `None`: this replica's own.
    pub fleet: Option<std::num::NonZeroU64>,
    pub created_at: SystemTime,
    /// When it lapses unless used; `None` for an API key, which never does.
    pub expires_at: Option<SystemTime>,
}
