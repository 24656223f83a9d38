//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk, `watch` noticing changes and `logs` reading the
//! per-instance logs.

pub mod declaration;
pub mod hypervisor;
pub mod images;
pub mod logs;
pub mod settings;
pub mod state;
pub mod store;
pub mod watch;
