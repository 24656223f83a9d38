//! `hypeman wait`: polls an instance's status until it is in the wanted
//! state or the time is up. Only looks; the daemon does the work.

use super::status::{status_by_name, InstanceStatus};
use super::view;
use super::{CliError, Context};
use crate::state::VmState;
use std::time::Duration;
use tokio::time::Instant;

/// Waits until the instance `query` names is in state `want`, looking every
/// `poll`. The name is resolved once, so a typo fails at once, while an
/// instance deleted meanwhile reads as `Stopped` (so waiting for a removed
/// instance to stop works).
pub async fn wait_for(
    ctx: &Context,
    query: &str,
    want: VmState,
    timeout: Duration,
    poll: Duration,
) -> Result<InstanceStatus, CliError> {
    let name = view::resolve(ctx, query)?;
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_by_name(ctx, &name).await;
        if status.state == want {
            return Ok(status);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CliError::WaitTimeout {
                name,
                want,
                timeout,
                seen: status.state,
                last_error: status.last_error,
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}
