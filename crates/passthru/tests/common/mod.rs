//! Helpers shared by the command-line tests: run the built `passthru`, read its output.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

/// A command for the `passthru` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_passthru"))
}

/// Runs `passthru` with `args` to completion.
pub fn passthru(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Starts `passthru` with `args`, its standard input, output and error piped.
pub fn spawn_piped(args: &[&str]) -> Child {
    bin().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Runs `passthru` with `args`, feeding `script` on standard input, to completion.
pub fn passthru_with_input(args: &[&str], script: &str) -> Output {
    let mut child = spawn_piped(args);
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `passthru bench <args> --json FILE`, checks it succeeded, and returns its
/// printed table and the parsed JSON (the file is removed).
pub fn bench_json(args: &[&str]) -> (String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("passthru-{}-{}.json", args[0], std::process::id()));
    let out = bin().arg("bench").args(args).arg("--json").arg(&json).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (text(&out.stdout), v)
}

/// Bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
