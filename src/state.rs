//! The instance state machine: the seven states, the single-hop transition
//! table, and the multi-hop orchestrations expressed as sequences of hops.
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
//! hypervisors; callers check a hop with [`VmState::can_transition_to`]
//! before any side effect and record the new state after it.

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

    /// A state with no VMM and nothing in flight: reconciling can rest here.
    pub fn is_terminal(self) -> bool {
        use VmState::*;
        match self {
            Stopped | Standby => true,
            Created | Running | Paused | Shutdown | Unknown => false,
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
    #[error("no orchestration leads from {from} to {goal}")]
    NoPath { from: VmState, goal: VmState },
}

/// The multi-hop orchestrations of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orchestration {
    /// `Stopped → Created → Running`.
    Create,
    /// `Running → Paused → Standby`.
    Standby,
    /// `Standby → Paused → Running`.
    Restore,
    /// `Running|Paused|Created → Shutdown → Stopped`, or `Standby → Stopped`.
    Stop,
    /// `Shutdown → Running` (a guest that shut down, started again).
    Start,
    /// `any → Stopped`, then all data removed.
    Delete,
}

impl Orchestration {
    /// The hops this orchestration takes from `from`, each checked against
    /// the table. An empty list means there is nothing to do.
    pub fn hops(self, from: VmState) -> Result<Vec<Hop>, StateError> {
        use VmState::*;
        let path: &[VmState] = match (self, from) {
            (Orchestration::Create, Stopped) => &[Created, Running],
            (Orchestration::Create, Created) => &[Running],
            (Orchestration::Create, Running) => &[],
            (Orchestration::Standby, Running) => &[Paused, Standby],
            (Orchestration::Standby, Paused) => &[Standby],
            (Orchestration::Standby, Standby) => &[],
            (Orchestration::Restore, Standby) => &[Paused, Running],
            (Orchestration::Restore, Paused) => &[Running],
            (Orchestration::Restore, Running) => &[],
            (Orchestration::Stop, Created | Running | Paused) => &[Shutdown, Stopped],
            (Orchestration::Stop, Shutdown | Standby) => &[Stopped],
            (Orchestration::Stop, Stopped) => &[],
            (Orchestration::Start, Shutdown) => &[Running],
            (Orchestration::Start, Running) => &[],
            (Orchestration::Delete, Created | Running | Paused) => &[Shutdown, Stopped],
            (Orchestration::Delete, Shutdown | Standby) => &[Stopped],
            // Unknown has no hops; delete force-removes the VMM and data.
            (Orchestration::Delete, Stopped | Unknown) => &[],
            (_, _) => {
                return Err(StateError::NoPath {
                    from,
                    goal: self.goal(),
                })
            }
        };
        let mut hops = Vec::with_capacity(path.len());
        let mut at = from;
        for &to in path {
            hops.push(at.hop(to)?);
            at = to;
        }
        Ok(hops)
    }

    /// The state this orchestration ends in.
    pub fn goal(self) -> VmState {
        match self {
            Orchestration::Create | Orchestration::Restore | Orchestration::Start => {
                VmState::Running
            }
            Orchestration::Standby => VmState::Standby,
            Orchestration::Stop | Orchestration::Delete => VmState::Stopped,
        }
    }
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
    fn vmm_requirement_and_terminality() {
        let needs_vmm: Vec<_> = ALL_STATES.into_iter().filter(|s| s.requires_vmm()).collect();
        assert_eq!(needs_vmm, vec![Created, Running, Paused, Shutdown]);
        let terminal: Vec<_> = ALL_STATES.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, vec![Stopped, Standby]);
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

    #[test]
    fn orchestrations_are_sequences_of_valid_hops() {
        let all = [
            Orchestration::Create,
            Orchestration::Standby,
            Orchestration::Restore,
            Orchestration::Stop,
            Orchestration::Start,
            Orchestration::Delete,
        ];
        for o in all {
            for from in ALL_STATES {
                if let Ok(hops) = o.hops(from) {
                    let end = hops.last().map(|h| h.to).unwrap_or(from);
                    if !(o == Orchestration::Delete && from == Unknown) {
                        assert_eq!(end, o.goal(), "{o:?} from {from}");
                    }
                    for w in hops.windows(2) {
                        assert_eq!(w[0].to, w[1].from);
                    }
                }
            }
        }
        let path = |o: Orchestration, from| -> Vec<VmState> {
            o.hops(from).unwrap().into_iter().map(|h| h.to).collect()
        };
        assert_eq!(path(Orchestration::Create, Stopped), vec![Created, Running]);
        assert_eq!(path(Orchestration::Standby, Running), vec![Paused, Standby]);
        assert_eq!(path(Orchestration::Restore, Standby), vec![Paused, Running]);
        assert_eq!(path(Orchestration::Stop, Running), vec![Shutdown, Stopped]);
        assert_eq!(path(Orchestration::Stop, Standby), vec![Stopped]);
        assert_eq!(path(Orchestration::Start, Shutdown), vec![Running]);
        assert_eq!(path(Orchestration::Delete, Paused), vec![Shutdown, Stopped]);
        assert!(path(Orchestration::Delete, Unknown).is_empty());
        assert_eq!(
            Orchestration::Standby.hops(Stopped),
            Err(StateError::NoPath { from: Stopped, goal: Standby })
        );
    }
}
