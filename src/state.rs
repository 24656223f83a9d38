//! The instance state machine: the seven states and the single-hop
//! transition table. The multi-hop orchestrations of DESIGN.md (create,
//! standby, restore, stop, delete) are the planner's walks from hop to hop
//! (`reconcile::plan`, whose tests follow each one), and what a step did is
//! an `Outcome` whose path is checked against this table.
//!
//! ```text
//!            create            boot
//!  Stopped ─────────► Created ──────► Running ◄──────────┐
//!     ▲  ▲               │              │  ▲  │  resume   │
//!     │  │               │ shutdown     │  │  └───────┐   │
//!     │  │               ▼              │  │ pause    ▼   │
//!     │  └─────────── Shutdown ◄────────┘  └──────── Paused
//!     │   stop VMM     ▲   │ start                     │ ▲
//!     │                │   └──► Running                │ │ restore
//!     │                └─────────── shutdown ──────────┘ │
//!     │                                     snapshot ▼   │
//!     └──────────────── discard ───────────────────── Standby
//!
//!  Unknown: the state could not be determined; only delete is allowed.
//! ```
//!
//! This module owns the rules only. It performs no IO and knows nothing of
//! hypervisors; the executor checks a step's hop with [`VmState::hop`]
//! before any side effect, and the owner checks the outcome's path after.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The state of one instance, as derived from the VMM and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// No VMM process and no snapshot.
    Stopped,
    /// The VMM exists and holds a VM that has not booted yet.
    Created,
    Running,
    Paused,
    /// The guest shut down; the VMM process still exists.
    Shutdown,
    /// No VMM; a complete snapshot exists on disk.
    Standby,
    /// The VMM socket exists but the VMM does not answer.
    Unknown,
}

/// Every state, in the order of DESIGN.md; handy for table tests and docs.
pub const ALL_STATES: [VmState; 7] = [
    VmState::Stopped,
    VmState::Created,
    VmState::Running,
    VmState::Paused,
    VmState::Shutdown,
    VmState::Standby,
    VmState::Unknown,
];

impl VmState {
    /// The single-hop transition table of DESIGN.md, exactly.
    pub fn can_transition_to(self, to: VmState) -> bool {
        use VmState::*;
        match self {
            Stopped => matches!(to, Created),
            Created => matches!(to, Running | Shutdown),
            Running => matches!(to, Paused | Shutdown),
            Paused => matches!(to, Running | Shutdown | Standby),
            Shutdown => matches!(to, Running | Stopped),
            Standby => matches!(to, Paused | Stopped),
            Unknown => false,
        }
    }

    /// Whether a VMM process must exist for an instance to be in this state.
    pub fn requires_vmm(self) -> bool {
        use VmState::*;
        match self {
            Created | Running | Paused | Shutdown => true,
            Stopped | Standby => false,
            // Unknown means a socket exists whose VMM does not answer; there
            // may or may not be a process behind it.
            Unknown => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        use VmState::*;
        match self {
            Stopped => "Stopped",
            Created => "Created",
            Running => "Running",
            Paused => "Paused",
            Shutdown => "Shutdown",
            Standby => "Standby",
            Unknown => "Unknown",
        }
    }

    /// Checks a hop, returning it as a value the caller can apply once its
    /// side effects succeeded.
    pub fn hop(self, to: VmState) -> Result<Hop, StateError> {
        if self.can_transition_to(to) {
            Ok(Hop { from: self, to })
        } else {
            Err(StateError::InvalidTransition { from: self, to })
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = StateError;

    /// Accepts the DESIGN.md spelling in any case (`Running`, `running`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_STATES
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| StateError::UnknownName(s.to_string()))
    }
}

/// A checked single hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub from: VmState,
    pub to: VmState,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("invalid transition {from} -> {to}")]
    InvalidTransition { from: VmState, to: VmState },
    #[error("{0:?} is not a state (expected one of Stopped, Created, Running, Paused, Shutdown, Standby, Unknown)")]
    UnknownName(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    /// Every (from, to) pair, against the table written out by hand.
    #[test]
    fn transition_table_covers_every_pair() {
        let allowed: &[(VmState, VmState)] = &[
            (Stopped, Created),
            (Created, Running),
            (Created, Shutdown),
            (Running, Paused),
            (Running, Shutdown),
            (Paused, Running),
            (Paused, Shutdown),
            (Paused, Standby),
            (Shutdown, Running),
            (Shutdown, Stopped),
            (Standby, Paused),
            (Standby, Stopped),
        ];
        let mut checked = 0;
        for from in ALL_STATES {
            for to in ALL_STATES {
                let expected = allowed.contains(&(from, to));
                assert_eq!(
                    from.can_transition_to(to),
                    expected,
                    "{from} -> {to} should be {}",
                    if expected { "allowed" } else { "refused" }
                );
                assert_eq!(from.hop(to).is_ok(), expected);
                checked += 1;
            }
        }
        assert_eq!(checked, 49);
    }

    #[test]
    fn unknown_allows_nothing_and_no_state_loops_to_itself() {
        for to in ALL_STATES {
            assert!(!Unknown.can_transition_to(to));
        }
        for s in ALL_STATES {
            assert!(!s.can_transition_to(s), "{s} -> {s}");
        }
    }

    #[test]
    fn vmm_requirement() {
        let needs_vmm: Vec<_> = ALL_STATES.into_iter().filter(|s| s.requires_vmm()).collect();
        assert_eq!(needs_vmm, vec![Created, Running, Paused, Shutdown]);
    }

    #[test]
    fn names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(s.as_str().parse::<VmState>().unwrap(), s);
            assert_eq!(s.as_str().to_lowercase().parse::<VmState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("asleep".parse::<VmState>().is_err());
    }
}
