//! The one rule for a test that needs a host tool or a privilege: when it is
//! there, the test runs; when it is missing, the test is skipped with a line
//! on stderr, unless the run asks for everything (`CI=true`, or
//! `HYPEMAN_REQUIRE_TOOLS=1` as `scripts/test.sh` sets it), and then the
//! missing tool fails the test by name. A run that asked for the whole
//! suite must never pass with parts of it quietly not run.
//!
//! Written once for both kinds of test: the integration tests reach it as
//! `support::gate`, the library's unit tests include this same file (see
//! `src/lib.rs`). It uses nothing but `std`, and decides nothing about
//! `HYPEMAN_REAL_VM`, which gates the CPU-heavy real-VM tests on its own.

use std::path::Path;

/// Whether this run must not skip for a missing tool: CI, or asked for.
pub fn required() -> bool {
    let set = |name: &str, values: &[&str]| std::env::var(name).is_ok_and(|v| values.contains(&v.as_str()));
    set("CI", &["true", "1"]) || set("HYPEMAN_REQUIRE_TOOLS", &["1", "true"])
}

/// Whether `tool` is installed: an absolute path must exist, a bare name
/// must be an executable file in a `PATH` directory (what `Command::new`
/// would run).
pub fn installed(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if tool.contains('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(tool))))
}

/// True when every one of `tools` is installed. Otherwise the first missing
/// one is a failure (when [`required`]) or a skip: a line on stderr, and
/// false for the caller to return on.
pub fn tools(tools: &[&str]) -> bool {
    match tools.iter().find(|t| !installed(t)) {
        None => true,
        Some(tool) => missing(&format!("{tool} is not installed")),
    }
}

/// Like [`tools`] for something that is not a program: `have` says whether
/// `what` (a privilege, a device) is available here.
pub fn capability(what: &str, have: bool) -> bool {
    have || missing(&format!("it needs {what}"))
}

fn missing(why: &str) -> bool {
    // libtest names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().filter(|n| *n != "main").unwrap_or("this test");
    assert!(
        !required(),
        "{test}: {why}, and this run must not skip (CI=true or HYPEMAN_REQUIRE_TOOLS=1; see scripts/setup.sh)"
    );
    eprintln!("skipping {test}: {why} (with CI=true or HYPEMAN_REQUIRE_TOOLS=1 this fails)");
    false
}
