//! `hypeman validate`: checks the settings and every declaration without
//! touching the data dir or any VM.
//!
//! Problems go to stderr, one `path:line:column: message` line each and
//! nothing else, sorted by file and position, so editors and CI can parse
//! them; exit 1. When all is well, `ok: N instances` goes to stdout; exit 0.

use super::CliError;
use crate::declaration::{scan_dir, Diagnostic};
use crate::settings::Settings;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Validates `config_dir`, writing the verdict to `out` and problems to
/// `err`. Every problem is reported in one run: invalid settings do not
/// stop the declarations from being checked (against the default limits).
pub fn validate(
    config_dir: &Path,
    data_dir: Option<&Path>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<ExitCode, CliError> {
    let mut problems: Vec<Diagnostic> = Vec::new();
    // A mistyped --config-dir would otherwise be "ok: 0 instances".
    if !config_dir.is_dir() {
        let what = if config_dir.exists() { "not a directory" } else { "does not exist" };
        problems.push(Diagnostic::whole_file(
            config_dir,
            format!("{what}: --config-dir (or HYPEMAN_CONFIG_DIR) names the directory holding hypeman.toml and instances/"),
        ));
    }
    let limits = match Settings::load(config_dir, data_dir) {
        Ok(settings) => settings.limits,
        Err(e) => {
            problems.extend(e.diagnostics());
            Settings::defaults().limits
        }
    };
    let instances_dir = crate::declaration::instances_dir(config_dir);
    // The daemon reads a missing instances/ as "nothing declared yet";
    // here it would be a silent "ok: 0 instances" for a config dir that
    // holds no declarations at all.
    if config_dir.is_dir() && !instances_dir.exists() {
        problems.push(Diagnostic::whole_file(
            &instances_dir,
            "does not exist: declarations are <config-dir>/instances/<name>.toml (create the directory, even if empty)",
        ));
    }
    let scan = scan_dir(&instances_dir, &limits);
    problems.extend(scan.all_diagnostics());
    if problems.is_empty() {
        let n = scan.valid.len();
        let noun = if n == 1 { "instance" } else { "instances" };
        writeln!(out, "ok: {n} {noun}").map_err(CliError::Output)?;
        return Ok(ExitCode::SUCCESS);
    }
    problems.sort();
    for p in &problems {
        writeln!(err, "{p}").map_err(CliError::Output)?;
    }
    Ok(ExitCode::FAILURE)
}
