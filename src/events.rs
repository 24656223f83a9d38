//! The daemon's events as they happen: every line an instance's journal
//! says (`instances::Journal`: steps, errors, restarts, what a look found
//! unexpected) is also published here, and `hypeman events` streams them
//! from the daemon's API. One bus per process: the journal is the only
//! publisher, so the stream and `hypeman.log` say the same things.

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use tokio::sync::broadcast;

/// How many events a slow reader may fall behind before it misses some
/// (it is told how many).
const BACKLOG: usize = 4096;

/// One event, as `events --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub instance: String,
    /// `error`, `warn`, `info`, `debug`, `trace`.
    pub level: String,
    pub message: String,
}

fn bus() -> &'static broadcast::Sender<Event> {
    static BUS: OnceLock<broadcast::Sender<Event>> = OnceLock::new();
    BUS.get_or_init(|| broadcast::channel(BACKLOG).0)
}

/// Publishes an event of `instance`; nobody listening costs nothing.
pub fn publish(instance: &str, level: tracing::Level, message: &str) {
    let bus = bus();
    if bus.receiver_count() == 0 {
        return;
    }
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let _ = bus.send(Event { time, instance: instance.to_string(), level: level.as_str().to_ascii_lowercase(), message: message.to_string() });
}

/// Every event published from now on.
pub fn subscribe() -> broadcast::Receiver<Event> {
    bus().subscribe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_what_is_published_after_they_came() {
        publish("web", tracing::Level::INFO, "before anyone listens");
        let mut rx = subscribe();
        publish("web", tracing::Level::WARN, "create VM failed: no space");
        let e = rx.recv().await.unwrap();
        assert_eq!((e.instance.as_str(), e.level.as_str(), e.message.as_str()), ("web", "warn", "create VM failed: no space"));
        assert!(e.time.ends_with('Z') && e.time.len() == "2026-12-02T12:00:00.000Z".len(), "{}", e.time);
    }
}
