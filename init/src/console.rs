//! Talking to the serial console, which the host stores as the instance's
//! `logs/app.log`: every init line starts with `hypeman-init:` so it can be
//! told apart from the app's own output (the line formats are the
//! contract's, `hypeman_contract::console`). Also the last act of init:
//! syncing and powering off, which is how the host learns the app ended.

use std::io::Write;

/// Prints one `hypeman-init: …` line. Writes to stderr, which is the console
/// (the kernel opens `/dev/console` for PID 1, and [`attach`] re-opens it
/// once devtmpfs is mounted). A failed write has nowhere to be reported.
pub fn say(message: &str) {
    let line = hypeman_contract::console::line(message);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Points stdin, stdout and stderr at `path` (normally `/dev/console`), so
/// init and the app it starts write to the console even if the kernel could
/// not open it before `/dev` was populated.
pub fn attach(path: &str) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: plain syscalls on a NUL-terminated path and fds we own.
    unsafe {
        let fd = libc::open(c_path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for target in 0..3 {
            if fd != target && libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
    Ok(())
}

/// Syncs every filesystem (so the overlay's data survives) and powers the
/// machine off; under `-no-reboot` or Cloud Hypervisor this ends the VMM.
/// Returns only if the kernel refused, e.g. when not running as PID 1.
pub fn power_off() {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
