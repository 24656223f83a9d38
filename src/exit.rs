//! How a guest ended on its own, read from the end of its console log.
//!
//! hypeman-init prints one line when the app ends (`app exited with status
//! N`, `app was killed by signal N (…)`), preceded by `…, stopping app
//! (SIGTERM)` when something outside asked it to stop. The latest boot
//! starts at init's `starting (version …)` line; a boot with no exit line
//! ended some other way (VMM killed or crashed, kernel panic). The line
//! formats are the host↔guest contract's (`hypeman_contract::console`), so
//! both sides compile the same ones. Parsing is pure; reading the tail is
//! the caller's.

use hypeman_contract::console::{AppExit, FATAL, PREFIX, STARTING, STOPPING_SUFFIX};
use serde::{Deserialize, Serialize};
use std::fmt;

/// How many console lines are searched for init's lines.
pub const TAIL_LINES: usize = 2000;

/// How the guest ended, as far as its console tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestEnd {
    /// The app exited by itself with this status.
    Exited { status: i32 },
    /// The app was killed by this signal, without a stop being asked for.
    Killed { signal: i32 },
    /// Init was asked to stop the app (power button, SIGTERM to init).
    StopRequested,
    /// Init itself failed (an entrypoint that cannot run, a disk it cannot
    /// mount); `reason` is its `fatal:` line (empty in records written
    /// before it was kept).
    InitFailed {
        #[serde(default)]
        reason: String,
    },
    /// The guest kernel panicked (no init it could run, init died, out of
    /// memory with nothing to kill): `reason` is what it said.
    KernelPanic { reason: String },
    /// No exit line: the VMM was killed or crashed.
    Unknown,
}

impl GuestEnd {
    /// The app itself ended cleanly: the one ending `on-failure` accepts.
    pub fn is_success(&self) -> bool {
        matches!(self, GuestEnd::Exited { status: 0 })
    }
}

impl fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestEnd::Exited { status } => write!(f, "the app exited with status {status}"),
            GuestEnd::Killed { signal } => write!(f, "the app was killed by signal {signal}"),
            GuestEnd::StopRequested => f.write_str("init was asked to stop the app (power button or SIGTERM)"),
            GuestEnd::InitFailed { reason } if reason.is_empty() => f.write_str(
                "hypeman-init failed: its `hypeman-init: fatal:` line in the app log (`hypeman logs`) says why",
            ),
            GuestEnd::InitFailed { reason } => write!(f, "hypeman-init failed: {reason}"),
            GuestEnd::KernelPanic { reason } => write!(f, "the guest kernel panicked: {reason}"),
            GuestEnd::Unknown => f.write_str("the VM ended without an exit line from init (VMM killed or crashed?)"),
        }
    }
}

/// What the kernel prints when it panics, before the reason.
const KERNEL_PANIC: &str = "Kernel panic - not syncing: ";

/// The reason of a kernel panic line, without the advice the kernel adds
/// after it (`No working init found.  Try passing init= option …`) or the
/// closing `---[ end Kernel panic … ]---` marker's brackets.
fn panic_reason(line: &str) -> Option<String> {
    let reason = line.split(KERNEL_PANIC).nth(1)?.trim_end();
    let reason = reason.strip_suffix("]---").unwrap_or(reason).trim_end();
    let reason = reason.split(". ").next().unwrap_or(reason);
    Some(reason.trim_end_matches('.').trim().to_string())
}

/// How the latest boot in `log` ended.
pub fn parse(log: &str) -> GuestEnd {
    let mut exit = None;
    let mut fatal: Option<String> = None;
    let mut stop_requested = false;
    for line in log.lines().rev() {
        // The console writes `\r\n`; the app's output may precede init's
        // prefix on a line that did not end in a newline.
        let Some(message) = line.trim_end().split(PREFIX).nth(1) else {
            // A panic ends the kernel: one after init's last line is how
            // the latest boot ended, even one before init ran (no init it
            // could run), whose boot has no starting line of its own.
            if exit.is_none() && fatal.is_none() && !stop_requested {
                if let Some(reason) = panic_reason(line) {
                    return GuestEnd::KernelPanic { reason };
                }
            }
            continue;
        };
        if message.starts_with(STARTING) {
            break;
        }
        if exit.is_none() {
            exit = AppExit::from_line(message);
            if fatal.is_none() {
                fatal = message.strip_prefix(FATAL).map(str::to_string);
            }
        } else if message.ends_with(STOPPING_SUFFIX) {
            stop_requested = true;
        }
    }
    match exit {
        None => match fatal {
            Some(reason) => GuestEnd::InitFailed { reason },
            None => GuestEnd::Unknown,
        },
        Some(_) if stop_requested => GuestEnd::StopRequested,
        Some(AppExit::Code(status)) => GuestEnd::Exited { status },
        Some(AppExit::Signal(signal)) => GuestEnd::Killed { signal },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "[    0.81] PCI: Fatal: No config space access function found\r\n\
hypeman-init: starting (version 0.1.0)\r\n\
hypeman-init: root filesystem ready (320 ms)\r\n\
hypeman-init: starting [\"sh\", \"-c\", \"exit 3\"] as 0:0 in / (335 ms)\r\n";

    #[test]
    fn reads_the_latest_boots_ending() {
        let exited = format!("{BOOT}hello\r\nhypeman-init: app exited with status 3\r\nhypeman-init: powering off\r\n[    2.75] reboot: Power down\r\n");
        assert_eq!(parse(&exited), GuestEnd::Exited { status: 3 });
        let killed = format!("{BOOT}hypeman-init: app was killed by signal 9 (SIGKILL)\r\n");
        assert_eq!(parse(&killed), GuestEnd::Killed { signal: 9 });
        // Output without a final newline runs into init's line.
        let glued = format!("{BOOT}partial linehypeman-init: app exited with status 0\r\n");
        assert_eq!(parse(&glued), GuestEnd::Exited { status: 0 });
        assert!(parse(&glued).is_success());
    }

    #[test]
    fn a_stop_from_outside_is_not_the_apps_own_exit() {
        let stopped = format!(
            "{BOOT}hypeman-init: power button pressed, stopping app (SIGTERM)\r\nAPP GOT TERM\r\nhypeman-init: app exited with status 0\r\n"
        );
        assert_eq!(parse(&stopped), GuestEnd::StopRequested);
        assert!(!parse(&stopped).is_success());
    }

    #[test]
    fn a_boot_without_an_exit_line_ended_some_other_way() {
        // The previous boot's exit does not count for the one after it.
        let crashed = format!("{BOOT}hypeman-init: app exited with status 0\r\n{BOOT}COUNTER 1\r\n");
        assert_eq!(parse(&crashed), GuestEnd::Unknown);
        assert_eq!(parse(""), GuestEnd::Unknown);
    }

    #[test]
    fn a_fatal_init_error_is_not_taken_for_a_crashed_vmm() {
        let fatal = format!(
            "{BOOT}hypeman-init: fatal: cannot execute /bin/nope: No such file or directory (os error 2)\r\n\
hypeman-init: synced; 0 leftover process(es) killed\r\nhypeman-init: powering off\r\n"
        );
        let reason = "cannot execute /bin/nope: No such file or directory (os error 2)".to_string();
        assert_eq!(parse(&fatal), GuestEnd::InitFailed { reason: reason.clone() });
        assert_eq!(parse(&fatal).to_string(), format!("hypeman-init failed: {reason}"));
        assert!(!parse(&fatal).is_success());
        // A fatal line of an earlier boot does not count.
        let later = format!("{fatal}{BOOT}COUNTER 1\r\n");
        assert_eq!(parse(&later), GuestEnd::Unknown);
        // Nor does one after the app's own exit line (a failure while winding down).
        let after = format!("{BOOT}hypeman-init: app exited with status 2\r\nhypeman-init: fatal: x\r\n");
        assert_eq!(parse(&after), GuestEnd::Exited { status: 2 });
        // Records written before the reason was kept still read.
        let old: GuestEnd = serde_json::from_str(r#"{"how":"init-failed"}"#).unwrap();
        assert_eq!(old, GuestEnd::InitFailed { reason: String::new() });
        assert!(old.to_string().contains("says why"), "{old}");
    }

    #[test]
    fn a_kernel_panic_is_reported_as_one_with_its_reason() {
        // No init it could run: the panic comes before init's first line.
        let no_init = "[    0.91] Run /init as init process\r\n\
[    0.92] Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. See Linux Documentation/admin-guide/init.rst for guidance.\r\n\
[    0.92] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.158-1\r\n\
[    0.93] ---[ end Kernel panic - not syncing: No working init found.  Try passing init= option to kernel. See Linux Documentation/admin-guide/init.rst for guidance. ]---\r\n";
        let end = parse(no_init);
        assert_eq!(end, GuestEnd::KernelPanic { reason: "No working init found".into() });
        assert_eq!(end.to_string(), "the guest kernel panicked: No working init found");
        // After an earlier, clean boot in the same log.
        let after = format!("{BOOT}hypeman-init: app exited with status 0\r\n{no_init}");
        assert_eq!(parse(&after), GuestEnd::KernelPanic { reason: "No working init found".into() });
        // Out of memory while the app ran.
        let oom = format!("{BOOT}COUNTER 1\r\n[    3.10] Kernel panic - not syncing: System is deadlocked on memory\r\n");
        assert_eq!(parse(&oom), GuestEnd::KernelPanic { reason: "System is deadlocked on memory".into() });
        // A panic of an earlier boot does not count for the next one.
        let later = format!("{oom}{BOOT}COUNTER 1\r\n");
        assert_eq!(parse(&later), GuestEnd::Unknown);
        let json = serde_json::to_string(&GuestEnd::KernelPanic { reason: "x".into() }).unwrap();
        assert_eq!(json, r#"{"how":"kernel-panic","reason":"x"}"#);
    }

    #[test]
    fn display_and_json() {
        assert_eq!(GuestEnd::Exited { status: 0 }.to_string(), "the app exited with status 0");
        let json = serde_json::to_string(&GuestEnd::Killed { signal: 9 }).unwrap();
        assert_eq!(json, r#"{"how":"killed","signal":9}"#);
        assert_eq!(serde_json::from_str::<GuestEnd>(r#"{"how":"unknown"}"#).unwrap(), GuestEnd::Unknown);
    }
}
