//! Loading the kernel modules the initrd carries, in the order the initrd
//! builder resolved from `modules.dep`. Init does no dependency resolution of
//! its own: the list is already ordered, so a failure here is reported per
//! module and boot goes on (a missing driver shows up later as a missing disk).
//! The list's path and format are the contract's (`hypeman_contract::modules`).

use std::ffi::CString;
use std::path::Path;

/// How loading one module went.
#[derive(Debug)]
pub enum LoadOutcome {
    Loaded,
    /// Built in or loaded before; not an error.
    AlreadyLoaded,
    Failed(std::io::Error),
}

/// Loads one module with `finit_module(2)`.
pub fn load(path: &Path) -> LoadOutcome {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return LoadOutcome::Failed(e),
    };
    let params = CString::default();
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the duration of the call and the parameter
    // string is NUL-terminated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        return LoadOutcome::Loaded;
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        LoadOutcome::AlreadyLoaded
    } else {
        LoadOutcome::Failed(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_file_is_a_failure_not_a_panic() {
        match load(Path::new("/nonexistent/hypeman-test.ko")) {
            LoadOutcome::Failed(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
