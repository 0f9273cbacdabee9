//! The `passthru` program as a user runs it: guests on KVM, exit codes, messages for
//! bad input, the qtest port on standard input and on a Unix socket, and the exit
//! benchmark. Tests that need KVM skip with a printed reason where it is missing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

#[test]
fn the_hello_guest_prints_its_line_and_exits_0() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "hello"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Hello from a passthru guest (256 MiB of RAM"), "{}", text(&out.stdout));
}

/// String I/O (`rep outsb`, a page of bytes per exit) to the error console: every byte
/// reaches standard error.
#[test]
fn string_io_to_the_error_console_loses_no_byte() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "hello", "--guest-arg", "128"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let dots = out.stderr.iter().filter(|b| **b == b'.').count();
    assert_eq!(dots, 128 * 1024 / 64 * 63, "every byte of 128 KiB written (63 dots a line)");
}

#[test]
fn memory_option_reaches_the_guest() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "hello", "--memory", "64M"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("(64 MiB of RAM"), "{}", text(&out.stdout));
}

/// Parses "guest counted C of F injected (asked A".
fn interrupt_counts(stdout: &str) -> (u64, u64, u64) {
    let line = stdout.lines().find(|l| l.starts_with("interrupts: guest counted")).expect("report line");
    let w: Vec<&str> = line.split_whitespace().collect();
    let n = |i: usize| w[i].trim_end_matches(',').parse::<u64>().unwrap();
    (n(3), n(5), n(8))
}

#[test]
fn every_injected_interrupt_reaches_the_guest() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "interrupts"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout} stderr: {}", text(&out.stderr));
    let (counted, fired, asked) = interrupt_counts(&stdout);
    assert!(asked >= 1000, "{stdout}");
    assert_eq!(fired, asked, "the VMM fired every interrupt asked: {stdout}");
    assert_eq!(counted, fired, "the guest counted every interrupt fired: {stdout}");
}

#[test]
fn a_guest_panic_exits_101_with_the_message_on_stderr() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "panic"]);
    assert_eq!(out.status.code(), Some(101));
    let err = text(&out.stderr);
    assert!(err.contains("guest panicked at") && err.contains("deliberate guest panic (answer 42)"), "{err}");
    assert!(!text(&out.stdout).contains("deliberate"), "the message goes to stderr only");
}

#[test]
fn guests_lists_the_built_in_programs() {
    let out = passthru(&["guests"]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    for name in ["hello", "interrupts", "panic", "exits"] {
        assert!(s.lines().any(|l| l.starts_with(name)), "{name} missing from {s}");
    }
}

#[test]
fn bad_arguments_get_a_clear_error_and_a_nonzero_exit() {
    let out = passthru(&["run", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("'lots' is not a size; write e.g. 256M"), "{}", text(&out.stderr));

    let out = passthru(&["run", "--guest", "no-such-guest"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("unknown guest 'no-such-guest'") && err.contains("hello"), "{err}");

    let out = passthru(&["run", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_elf_file_is_refused_without_a_panic() {
    let dir = std::env::temp_dir().join(format!("passthru-badelf-{}", std::process::id()));
    std::fs::write(&dir, b"\x7fELF this is not really an ELF file at all, only its magic.........").unwrap();
    let out = passthru(&["run", "--guest", dir.to_str().unwrap()]);
    let _ = std::fs::remove_file(&dir);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    if vmm::kvm_available() {
        assert!(err.contains("cannot load guest ELF"), "{err}");
    }
}

#[test]
fn a_too_small_memory_size_names_the_fix() {
    let out = passthru(&["run", "--accel", "qtest", "--memory", "1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("pass --memory 32M or more"), "{}", text(&out.stderr));
}

#[test]
fn without_kvm_run_says_so_and_points_to_qtest() {
    let out = bin().arg("run").env(vmm::accel::KVM_PATH_ENV, "/nonexistent/kvm").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("KVM is not available (/nonexistent/kvm"), "{err}");
    assert!(err.contains("passthru run --accel qtest"), "{err}");
}

#[test]
fn qtest_on_standard_input_answers_each_line() {
    let out = passthru_with_input(
        &["run", "--accel", "qtest", "--memory", "64M"],
        "writel 0x5000 0xcafe\nreadl 0x5000\nhcall 0\nbogus\n",
    );
    assert_eq!(out.status.code(), Some(0), "EOF ends the session with 0: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        vec!["OK", "OK 0x000000000000cafe", "OK 0x0 0x0 0x0 0x0", "FAIL Unknown command 'bogus'"]
    );
}

#[test]
fn qtest_exit_port_sets_the_exit_code() {
    let out = passthru_with_input(&["run", "--accel", "qtest"], "outb 0xf4 7\nreadb 0\n");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "OK\n", "nothing after the exit is served");
}

#[test]
fn qtest_on_a_unix_socket_serves_one_connection_and_removes_the_socket() {
    let path = std::env::temp_dir().join(format!("passthru-qtest-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut child = bin().args(["run", "--qtest", path.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stream = None;
    for _ in 0..500 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&path) {
            stream = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let stream = stream.expect("passthru listens on the socket");
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let mut ask = |c: &str| {
        writeln!(w, "{c}").unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    };
    assert_eq!(ask("writeq 0x8000 0x1122334455667788"), "OK");
    assert_eq!(ask("read 0x8000 8"), "OK 0x8877665544332211");
    assert_eq!(ask("outb 0xf4 0"), "OK");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn bench_exits_prints_the_table_and_writes_json() {
    vmm::require_kvm!();
    let (table, v) = bench_json(&["exits", "--iterations", "500", "--runs", "2"]);
    for probe in ["null hypercall-port exit", "MMIO write exit", "ioeventfd write (no exit)"] {
        assert!(table.contains(probe), "{table}");
    }
    assert!(table.contains("median of 2 runs"), "{table}");
    assert_eq!((v["iterations"].as_u64(), v["runs"].as_u64()), (Some(500), Some(2)));
    // Every figure over both runs: its median lies within the spread of the values.
    for s in v["spread"].as_array().unwrap() {
        let values: Vec<f64> = s["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(values.len(), 2, "{s}");
        let (lo, hi, mid) = (s["min"].as_f64().unwrap(), s["max"].as_f64().unwrap(), s["median"].as_f64().unwrap());
        assert!(lo <= mid && mid <= hi && values.iter().all(|x| (lo..=hi).contains(x)), "{s}");
    }
    let figs = v["figures"].as_array().unwrap();
    assert_eq!(figs.len(), 3);
    let ns = |i: usize| figs[i]["ns_per_op"].as_f64().unwrap();
    assert!(ns(0) > 0.0 && ns(1) > 0.0, "exits take time: {v}");
    assert!(ns(2) < ns(0), "an ioeventfd write is cheaper than an exit: {v}");
    assert_eq!(figs[0]["ratio_to_null_exit"].as_f64().unwrap(), 1.0);
}

#[test]
fn bench_dma_reports_every_figure() {
    let (table, v) = bench_json(&["dma", "--quick"]);
    for row in ["translate 64 B, IOTLB hit", "map + unmap 4 KiB", "4 KiB (x1)", "1024 KiB (x1)", "100000"] {
        assert!(table.contains(row), "{row} missing: {table}");
    }
    for key in
        ["translate_hit_ns", "translate_hit_batched_ns", "translate_miss_ns", "map_unmap_4k_ns", "map_unmap_2m_ns"]
    {
        let ns = v[key].as_f64().unwrap();
        assert!(ns.is_finite() && ns > 0.0, "{key} = {ns}");
    }
    let copies = v["copy"].as_array().unwrap();
    assert_eq!(copies.len(), 4);
    for c in copies {
        let r = c["ratio"].as_f64().unwrap();
        assert!(r > 0.0 && r.is_finite(), "{c}");
    }
    let scaling = v["scaling"].as_array().unwrap();
    assert_eq!(
        scaling.iter().map(|s| s["mappings"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![10, 100, 1000, 10_000, 100_000]
    );
}
