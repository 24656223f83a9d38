//! The reconciler: one worker per instance, each running
//! observe → [`plan::plan`] → execute until converged.
//!
//! Level-triggered: a nudge carries no event, only a name, and every
//! reconcile reads the latest declaration and observes the latest state.
//! Bursts of nudges are coalesced (the first acts at once, the rest within
//! the debounce window become one more pass). Errors back off
//! exponentially; every instance is looked at again on a timer as a safety
//! net, and a live VMM more often, to notice when it dies.

pub mod plan;
pub mod worker;

pub use worker::{Reconciler, ReconcilerHandle};
