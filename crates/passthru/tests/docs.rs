//! The docs stay true: every command in a ```` ```sh runnable ```` block of README.md,
//! docs/*.md and guest/README.md is run and prints what the block shows, and every
//! figure the docs quote as `[VALUE](bench/NAME.json "FIGURE")` is the median a bench
//! run wrote to that file.
//!
//! A runnable block holds `$ COMMAND` lines (run with `sh -c` from the repository root,
//! the built `passthru` first on PATH, standard error merged into standard output),
//! each followed by the lines its output starts with; a shown line ending in `...`
//! matches any line it begins.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md, docs/*.md and guest/README.md, with their text.
fn doc_files() -> Vec<(PathBuf, String)> {
    let root = repo();
    let mut paths = vec![root.join("README.md"), root.join("guest/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

/// One command of a runnable block and the output lines shown after it.
#[derive(Debug)]
struct Runnable {
    file: String,
    line: usize,
    command: String,
    shown: Vec<String>,
}

/// The runnable blocks' commands in `text`.
fn runnables(file: &str, text: &str) -> Vec<Runnable> {
    let mut out: Vec<Runnable> = Vec::new();
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        if !inside {
            inside = fence && line.trim() == "```sh runnable";
            continue;
        }
        if fence {
            inside = false;
        } else if let Some(command) = line.strip_prefix("$ ") {
            out.push(Runnable { file: file.into(), line: i + 1, command: command.into(), shown: Vec::new() });
        } else if let Some(r) = out.last_mut() {
            r.shown.push(line.into());
        } else {
            panic!("{file}:{}: a runnable block starts with `$ COMMAND`", i + 1);
        }
    }
    out
}

/// Runs `command` as the docs say (60 s at most); its merged output.
fn run(command: &str) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_passthru")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1; {command}"))
        .current_dir(repo())
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{command}` did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().unwrap().unwrap()
}

fn matches(shown: &str, actual: &str) -> bool {
    match shown.strip_suffix("...") {
        Some(prefix) => actual.starts_with(prefix),
        None => actual.trim_end() == shown.trim_end(),
    }
}

/// Whether a command needs /dev/kvm (a `passthru run` without `--accel qtest`).
fn needs_kvm(command: &str) -> bool {
    command.contains("passthru run") && !command.contains("--accel qtest") && !command.contains("--device help")
}

#[test]
fn runnable_commands_in_the_docs_print_what_the_docs_show() {
    let mut all = Vec::new();
    for (path, text) in doc_files() {
        let name = path.strip_prefix(repo()).unwrap_or(&path).display().to_string();
        all.extend(runnables(&name, &text));
    }
    assert!(all.len() >= 6, "the README and qtest.md hold runnable examples: {all:?}");
    let kvm = vmm::kvm_available();
    let mut failures = Vec::new();
    for r in &all {
        assert!(!r.shown.is_empty(), "{}:{}: `{}` shows no output to check", r.file, r.line, r.command);
        if !kvm && needs_kvm(&r.command) {
            eprintln!("skipped {}:{} (needs KVM): {}", r.file, r.line, r.command);
            continue;
        }
        let out = run(&r.command);
        let lines: Vec<&str> = out.lines().collect();
        let ok = r.shown.len() <= lines.len() && r.shown.iter().zip(&lines).all(|(s, a)| matches(s, a));
        if !ok {
            failures.push(format!(
                "{}:{}: `{}`\n  the docs show:\n    {}\n  it printed:\n    {}",
                r.file,
                r.line,
                r.command,
                r.shown.join("\n    "),
                lines.iter().take(r.shown.len() + 3).copied().collect::<Vec<_>>().join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A figure quoted in the docs: its text, the bench file and the figure's name.
#[derive(Debug)]
struct Quote {
    file: String,
    value: String,
    json: PathBuf,
    figure: String,
}

/// Every `[VALUE](…bench/NAME.json "FIGURE")` in `text`; links are relative to `dir`.
fn quotes(file: &str, dir: &Path, text: &str) -> Vec<Quote> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let (before, after) = (&rest[..at], &rest[at + 2..]);
        rest = &rest[at + 2..];
        let Some(open) = before.rfind('[') else { continue };
        // `LINK "TITLE")`: the title may hold parentheses, not a quote.
        let Some(space) = after.find(" \"") else { continue };
        let link = &after[..space];
        if link.contains(')') || !link.ends_with(".json") || !link.contains("bench/") {
            continue;
        }
        let Some(end) = after[space + 2..].find("\")") else { continue };
        out.push(Quote {
            file: file.into(),
            value: before[open + 1..].into(),
            json: dir.join(link),
            figure: after[space + 2..space + 2 + end].into(),
        });
    }
    out
}

/// The number at the start of `value` ("0.62x", "11 ns") and its decimals.
fn number(value: &str) -> Option<(f64, usize)> {
    let digits: String = value.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let decimals = digits.split_once('.').map_or(0, |(_, d)| d.len());
    digits.parse().ok().map(|v| (v, decimals))
}

#[test]
fn figures_quoted_in_the_docs_are_the_medians_bench_runs_wrote() {
    let mut all = Vec::new();
    for (path, text) in doc_files() {
        let name = path.strip_prefix(repo()).unwrap_or(&path).display().to_string();
        all.extend(quotes(&name, path.parent().unwrap(), &text));
    }
    assert!(all.len() >= 5, "docs/architecture.md quotes bench figures: {all:?}");
    for q in &all {
        let text = std::fs::read_to_string(&q.json).unwrap_or_else(|e| panic!("{}: {}: {e}", q.file, q.json.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let spread =
            v["spread"].as_array().unwrap_or_else(|| panic!("{}: no spread (run with --runs)", q.json.display()));
        let fig = spread
            .iter()
            .find(|s| s["name"] == q.figure.as_str())
            .unwrap_or_else(|| panic!("{}: {} has no figure {:?}", q.file, q.json.display(), q.figure));
        let median = fig["median"].as_f64().unwrap();
        let (quoted, decimals) =
            number(&q.value).unwrap_or_else(|| panic!("{}: {:?} is not a number", q.file, q.value));
        let rounded = format!("{median:.decimals$}");
        assert_eq!(
            format!("{quoted:.decimals$}"),
            rounded,
            "{}: {:?} quotes {:?} but {} says its median is {median}",
            q.file,
            q.value,
            q.figure,
            q.json.display()
        );
    }
}

#[test]
fn the_parsers_find_what_the_docs_hold() {
    let text = "x\n```sh runnable\n$ passthru guests\npvdma ...\n$ true\nOK\n```\n```\n$ not run\n```\n";
    let r = runnables("t", text);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].command.as_str(), r[0].shown.as_slice(), r[1].line),
        ("passthru guests", &["pvdma ...".to_string()][..], 5)
    );
    assert!(matches("pvdma ...", "pvdma        the default demo") && !matches("OK", "OK 0x1"));
    let q = quotes(
        "t",
        Path::new("docs"),
        "costs [0.62x](bench/devices.json \"shared fd (64 KiB)\") and [a](b.md) [b](c.md \"t\") [1x](bench/x.json \"y\")",
    );
    assert_eq!(q.len(), 2);
    assert_eq!((q[0].value.as_str(), q[0].figure.as_str()), ("0.62x", "shared fd (64 KiB)"));
    assert_eq!((q[1].value.as_str(), q[1].figure.as_str()), ("1x", "y"));
    assert_eq!(number("11x"), Some((11.0, 0)));
    assert_eq!(number("0.030x"), Some((0.03, 3)));
}
