//! The console lines init prints and the host reads back from the guest's
//! console log (`logs/app.log`): every init line starts with [`PREFIX`];
//! a boot starts with a [`starting`] line, and ends with the app's exit
//! ([`AppExit`]'s `Display`, parsed back by [`AppExit::from_line`]), a
//! [`FATAL`] line, or neither when the VM died some other way. A stop asked
//! for from outside is announced first by a line ending in
//! [`STOPPING_SUFFIX`].
//!
//! Formatting and parsing only; writing to the console is init's.

/// What every init line starts with.
pub const PREFIX: &str = "hypeman-init: ";
/// The first line of every boot, after [`PREFIX`]; the version follows.
pub const STARTING: &str = "starting (version ";
/// How init's line for an error that ends the boot begins (after
/// [`PREFIX`]); the host reports such a guest as failed in init.
pub const FATAL: &str = "fatal: ";
/// How every line announcing a stop from outside (power button, SIGTERM to
/// init) ends, for the host to tell such a stop apart from the app ending
/// by itself.
pub const STOPPING_SUFFIX: &str = ", stopping app (SIGTERM)";

/// One console line as init writes it: [`PREFIX`], the message, a newline.
pub fn line(message: &str) -> String {
    format!("{PREFIX}{message}\n")
}

/// The message that opens every boot (after [`PREFIX`]).
pub fn starting(version: &str) -> String {
    format!("{STARTING}{version})")
}

/// How the app ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppExit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for AppExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppExit::Code(code) => write!(f, "app exited with status {code}"),
            AppExit::Signal(sig) => {
                write!(f, "app was killed by signal {sig} ({})", signal_name(*sig))
            }
        }
    }
}

impl AppExit {
    /// The inverse of `Display`: the host reads this line from the console
    /// log to learn how the app ended.
    pub fn from_line(message: &str) -> Option<AppExit> {
        if let Some(code) = message.strip_prefix("app exited with status ") {
            return code.trim().parse().ok().map(AppExit::Code);
        }
        let rest = message.strip_prefix("app was killed by signal ")?;
        rest.split_whitespace().next()?.parse().ok().map(AppExit::Signal)
    }
}

/// The name of a signal in init's lines; the number is what the host
/// parses, the name is for the reader.
pub fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGPWR => "SIGPWR",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_lines_are_what_the_host_greps_for() {
        assert_eq!(AppExit::Code(0).to_string(), "app exited with status 0");
        assert_eq!(AppExit::Code(3).to_string(), "app exited with status 3");
        assert_eq!(
            AppExit::Signal(15).to_string(),
            "app was killed by signal 15 (SIGTERM)"
        );
    }

    #[test]
    fn exit_lines_parse_back() {
        for exit in [AppExit::Code(0), AppExit::Code(255), AppExit::Signal(9)] {
            assert_eq!(AppExit::from_line(&exit.to_string()), Some(exit));
        }
        assert_eq!(AppExit::from_line("app exited with status x"), None);
        assert_eq!(AppExit::from_line("starting (version 0.1.0)"), None);
    }

    #[test]
    fn lines_carry_the_prefix_and_the_boot_opens_with_the_version() {
        assert_eq!(line("powering off"), "hypeman-init: powering off\n");
        assert_eq!(
            line(&starting("0.1.0")),
            "hypeman-init: starting (version 0.1.0)\n"
        );
        assert!(starting("0.1.0").starts_with(STARTING));
        assert_eq!(
            line(&format!("{FATAL}no disk")),
            "hypeman-init: fatal: no disk\n"
        );
    }
}
