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
    let data_dir = ctx.instances.store().data_dir().to_path_buf();
    loop {
        // The daemon's view when one answers (it polls nothing itself);
        // the stored view, looked at here, when none does.
        let asked = crate::api::Op::Status { name: Some(name.clone()) };
        let status = match crate::api::client::ask_as::<InstanceStatus>(&data_dir, asked).await {
            Ok(Some(status)) => status,
            Ok(None) => status_by_name(ctx, &name).await,
            // A name the daemon does not know (yet): as the stored view.
            Err(crate::api::client::ClientError::Refused { kind: crate::api::protocol::ErrorKind::NotFound, .. }) => status_by_name(ctx, &name).await,
            Err(e) => return Err(e.into()),
        };
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
