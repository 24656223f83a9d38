//! The `hypeman` executable: a thin edge over the library's `cli` module.
//! It prints a failure's error chain once, here, and nowhere else.

use std::process::ExitCode;

fn main() -> ExitCode {
    match hypeman::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hypeman: {}", hypeman::instances::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
