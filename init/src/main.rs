//! The guest's PID 1. Boots (see `boot`), runs the app, reports how it
//! ended and powers the VM off. Every failure, including a panic, ends the
//! same way: one `hypeman-init: fatal: …` line, sync, power off. Returning
//! from PID 1 would panic the kernel, so this never returns while PID 1.

use std::process::ExitCode;
use std::time::Instant;

use hypeman_contract::console::{starting, FATAL};
use hypeman_init::console::{power_off, say};
use hypeman_init::error::chain;

fn main() -> ExitCode {
    let started = Instant::now();
    if std::process::id() != 1 {
        eprintln!("hypeman-init: refusing to run: this is the guest's PID 1, not a host command");
        return ExitCode::FAILURE;
    }
    std::panic::set_hook(Box::new(|info| {
        // The agent is a helper: its panic ends its thread, not the guest.
        if std::thread::current().name() == Some(hypeman_init::agent::THREAD_NAME) {
            say(&format!("agent: stopped: panic: {info}"));
            return;
        }
        say(&format!("{FATAL}panic: {info}"));
        power_off();
    }));
    say(&starting(env!("CARGO_PKG_VERSION")));
    match hypeman_init::boot::boot(started) {
        Ok(exit) => say(&exit.to_string()),
        Err(e) => say(&format!("{FATAL}{}", chain(&e))),
    }
    say(&hypeman_init::shutdown::wind_down().to_string());
    say("powering off");
    power_off();
    // Only reached if the kernel refused to power off; spinning keeps the
    // message on screen instead of a "init exited" panic on top of it.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
