//! Helpers shared by the command-line tests: run the built `passthru`, read its output.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Command, Output};

/// A command for the `passthru` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_passthru"))
}

/// Runs `passthru` with `args` to completion.
pub fn passthru(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
