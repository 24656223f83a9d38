//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk, `watch` noticing changes and `logs` reading the
//! per-instance logs. `cli` is the command line over all of it.

pub mod cli;
pub mod daemon;
pub mod declaration;
pub mod hypervisor;
pub mod images;
pub mod logs;
pub mod settings;
pub mod state;
pub mod store;
pub mod system;
pub mod watch;
pub mod instances;
pub mod reconcile;
