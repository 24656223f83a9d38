//! hypeman: a declarative microVM manager.
//!
//! `declaration` → `reconcile` → `instances` → `hypervisor`, with `store`
//! holding what is on disk, `watch` noticing changes and `logs` reading the
//! per-instance logs. `cli` is the command line over all of it.

pub mod cli;
pub mod daemon;
pub mod exit;
pub mod declaration;
pub mod durable;
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
}
