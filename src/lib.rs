//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk, `watch` noticing changes and `logs` reading the
//! per-instance logs. `cli` is the command line over all of it.
//! Both TOML files (`declaration`, `settings`) are read with `config_file`;
//! what the guest's PID 1 must agree with is the `hypeman-contract` crate.
//! Imports point one way: `tests/layers.rs` fails on a cycle or on a lower
//! layer importing a higher one.

pub mod agent;
pub mod api;
pub mod cli;
pub mod config_file;
pub mod daemon;
pub mod exit;
pub mod declaration;
pub mod durable;
pub mod events;
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

/// When a test may skip for a missing tool: the same file the integration
/// tests use as `support::gate`, so the rule is written once.
#[cfg(test)]
#[path = "../tests/support/gate.rs"]
pub(crate) mod test_gate;

/// An error and its causes on one line, `a: b: c`: how every edge (the CLI,
/// log lines, status) prints a chain, once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut last = s.clone();
    while let Some(c) = cur {
        let text = c.to_string();
        // Two layers that say the same (`create failed: create failed`)
        // are printed once.
        if text != last {
            s.push_str(": ");
            s.push_str(&text);
        }
        last = text;
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Layer {
        #[error("{0} failed")]
        Op(&'static str, #[source] Box<Layer>),
        #[error("the cause")]
        Cause,
    }

    #[test]
    fn a_chain_says_each_distinct_layer_once() {
        use Layer::*;
        let e = Op("create VM", Box::new(Op("create", Box::new(Op("create", Box::new(Cause))))));
        assert_eq!(super::error_chain(&e), "create VM failed: create failed: the cause");
    }

    #[test]
    fn the_test_gate_finds_tools_by_path_and_by_name() {
        use super::test_gate::installed;
        assert!(installed("sh"), "sh is in every PATH");
        assert!(installed("/bin/sh"));
        assert!(!installed("/nonexistent/tool"));
        assert!(!installed("hypeman-no-such-tool"));
    }
}
