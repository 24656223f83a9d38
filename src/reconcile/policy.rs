//! The error policy: what a failed step means for the next attempt. Every
//! step error has an [`ErrorKind`]; [`error_policy`] alone maps it (and how
//! many failures came before) to the owner's next action, as kube-runtime's
//! `error_policy` does for a controller.
//!
//! Pure: no clock, no IO. The kinds themselves are the erring module's to
//! tell (`instances::ErrorKind`, from `InstanceError::kind`); this module
//! only decides what follows.

pub use crate::instances::ErrorKind;
use crate::settings::ReconcileSettings;
use std::time::Duration;

/// What the owner does after a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Try again when the declaration or the settings change.
    AwaitChange,
    /// The snapshot does not fit: look at the free space again after this
    /// long, with the guest left running meanwhile.
    RecheckSpace(Duration),
}

impl Next {
    /// How `status` says what happens next, after the error itself.
    pub fn describe(self) -> String {
        match self {
            Next::RetryAfter(wait) => format!("retrying in {}", humantime::format_duration(round_ms(wait))),
            Next::AwaitChange => "waiting for a change to the declaration or settings".to_string(),
            Next::RecheckSpace(wait) => format!(
                "the guest keeps running; free space is checked again every {} and the standby goes on once it fits",
                humantime::format_duration(round_ms(wait))
            ),
        }
    }
}

/// Durations as people read them: whole milliseconds.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The next action after the `failures`-th failure in a row of this kind.
pub fn error_policy(kind: ErrorKind, failures: u32, settings: &ReconcileSettings) -> Next {
    match kind {
        ErrorKind::Transient => Next::RetryAfter(backoff(settings, failures)),
        // A try costs one statvfs and never pauses the guest (the check
        // comes before the pause), so there is nothing to back off from,
        // and a freed disk is noticed within one health interval.
        ErrorKind::LacksSpace => Next::RecheckSpace(settings.health_interval),
        ErrorKind::NeedsChange | ErrorKind::Permanent => Next::AwaitChange,
    }
}

/// Exponential backoff: `backoff_initial` doubled per failure after the
/// first, at most `backoff_max`.
pub fn backoff(settings: &ReconcileSettings, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    settings.backoff_initial.saturating_mul(1u32 << exp).min(settings.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ReconcileSettings {
        let mut s = crate::settings::Settings::defaults().reconcile;
        s.backoff_initial = Duration::from_secs(1);
        s.backoff_max = Duration::from_secs(8);
        s
    }

    #[test]
    fn transient_errors_back_off_exponentially_up_to_the_maximum() {
        let s = settings();
        let waits: Vec<Next> = (1..=6).map(|n| error_policy(ErrorKind::Transient, n, &s)).collect();
        let secs = |n| Next::RetryAfter(Duration::from_secs(n));
        assert_eq!(waits, vec![secs(1), secs(2), secs(4), secs(8), secs(8), secs(8)]);
        assert_eq!(error_policy(ErrorKind::Transient, u32::MAX, &s), secs(8), "no overflow");
    }

    #[test]
    fn errors_that_need_a_change_or_are_permanent_are_not_retried() {
        let s = settings();
        for n in [1, 2, 10] {
            assert_eq!(error_policy(ErrorKind::NeedsChange, n, &s), Next::AwaitChange);
            assert_eq!(error_policy(ErrorKind::Permanent, n, &s), Next::AwaitChange);
        }
    }

    #[test]
    fn a_snapshot_that_does_not_fit_is_checked_again_at_a_steady_pace() {
        let mut s = settings();
        s.health_interval = Duration::from_secs(5);
        for n in [1, 2, 10, 1000, u32::MAX] {
            assert_eq!(error_policy(ErrorKind::LacksSpace, n, &s), Next::RecheckSpace(Duration::from_secs(5)), "failure {n}");
        }
        assert!(Next::RecheckSpace(Duration::from_secs(5)).describe().contains("keeps running"));
    }

    #[test]
    fn status_says_which() {
        assert_eq!(Next::RetryAfter(Duration::from_millis(8000)).describe(), "retrying in 8s");
        assert_eq!(Next::RetryAfter(Duration::from_nanos(20_000_123)).describe(), "retrying in 20ms");
        assert_eq!(Next::AwaitChange.describe(), "waiting for a change to the declaration or settings");
    }
}
