//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk and `watch` noticing changes.

pub mod declaration;
pub mod logs;
pub mod settings;
pub mod state;
pub mod watch;
