//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk, `watch` noticing changes and `logs` reading the
//! per-instance logs. `cli` is the command line over all of it.

pub mod cli;
pub mod daemon;
pub mod exit;
pub mod declaration;
pub mod hypervisor;
pub mod images;
pub mod logs;
pub mod network;
pub mod settings;
pub mod state;
pub mod store;
pub mod system;
pub mod watch;
pub mod instances;
pub mod reconcile;

/// An error and its causes on one line, `a: b: c`: how every edge (the CLI,
/// log lines, status) prints a chain, once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
