//! Interrupt forwarding end to end: guests on KVM count every interrupt while the VMM
//! switches delivery; the qtest port switches and lists sources. Tests that need KVM
//! skip with a printed reason where it is missing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use common::*;

use std::io::Write;

/// The numbers of the first line starting with `prefix`, in order.
fn numbers(s: &str, prefix: &str) -> Vec<u64> {
    let line = s.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no '{prefix}' line in {s}"));
    line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect()
}

#[test]
fn irqstorm_every_msi_arrives_while_forwarding_switches_10000_times() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "irqstorm"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    // "irqstorm: guest counted C of F fired (asked N, M forwarding switches asked)"
    let n = numbers(&stdout, "irqstorm:");
    assert_eq!((n[0], n[1], n[2], n[3]), (100_000, 100_000, 100_000, 10_000), "{stdout}");
    // The VMM's side: switches really made while firing, no time-out.
    let v = numbers(&stderr, "passthru: test-irq:");
    assert_eq!((v[0], v[1], v[2]), (100_000, 100_000, 10_000), "{stderr}");
    assert!(stderr.contains("timed out no"), "{stderr}");
}

fn intx(mode: &str, args: &[&str]) -> (u64, u64, u64, String) {
    let mut a = vec!["run", "--guest", "intx", "--irq-mode", mode];
    a.extend_from_slice(args);
    let out = passthru(&a);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    // "intx: guest counted C of A assertions (asked N, spurious S, device saw R resamples)"
    let n = numbers(&stdout, "intx:");
    assert_eq!(n[0], n[1], "every assertion seen exactly once: {stdout}");
    (n[0], n[2], n[4], stdout + &stderr)
}

#[test]
fn level_intx_is_seen_once_per_assertion_and_rearmed_by_each_eoi_when_forwarded() {
    vmm::require_kvm!();
    let (counted, asked, resamples, all) = intx("forwarded", &[]);
    assert_eq!(counted, asked, "{all}");
    // Every EOI reaches the device as a resample (the last one may come after the
    // device stopped listening).
    assert!(resamples + 1 >= counted, "{all}");
}

#[test]
fn level_intx_is_seen_once_per_assertion_when_the_vmm_delivers() {
    vmm::require_kvm!();
    let (counted, asked, resamples, all) = intx("vmm", &[]);
    assert_eq!(counted, asked, "{all}");
    // Through the VMM's relay the device is re-armed by the relay's EOIs. KVM signals a
    // resample once per EOI of the relay's line, and under load an assertion can be
    // relayed while the line is still in service, so two EOIs of the guest can be one
    // of the relay (seen: 878 of 1,000 with both cores busy, on the old code as well).
    // The count that must be exact is the guest's, above.
    assert!(resamples * 2 >= counted, "{all}");
}

#[test]
fn level_intx_line_state_survives_forwarding_switches() {
    vmm::require_kvm!();
    let (counted, asked, _, all) = intx("forwarded", &["--guest-arg", "1000", "--guest-arg", "200"]);
    assert_eq!((counted, asked), (1000, 1000), "{all}");
    assert!(all.contains("forwarding switches 200"), "{all}");
}

#[test]
fn msi_guest_counts_every_interrupt_when_the_vmm_delivers() {
    vmm::require_kvm!();
    let out = passthru(&["run", "--guest", "interrupts", "--irq-mode", "vmm"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn qtest_lists_switches_and_counts_sources() {
    let script = "irq_list\n\
                  hcall 0x10 0x40\n\
                  irq_list\n\
                  irq_counts\n\
                  irq_forward test-irq 1 0\n\
                  irq_forward test-irq 1 0\n\
                  irq_unforward nosuch 1 0\n\
                  irq_mode test-irq 1 0 vmm\n\
                  irq_mode test-irq 1 0 sideways\n\
                  irq_list\n";
    let out = passthru_with_input(&["run", "--accel", "qtest", "--irq-mode", "vmm", "--test-sources"], script);
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        vec![
            "OK acpi-hotplug/0/0=vmm serial/0/0=vmm",
            "OK 0x0 0x18 0x0 0x0",
            "OK acpi-hotplug/0/0=vmm serial/0/0=vmm test-irq/1/0=vmm",
            "OK sources=3 forwarded=0 irqfds=0 watched=3 msi_routes=1",
            "OK",
            "FAIL IRQ source test-irq/1/0 is already forwarded",
            "FAIL IRQ source nosuch/1/0 is not attached",
            "OK",
            "FAIL 'sideways' is not an IRQ mode; use forwarded or vmm",
            "OK acpi-hotplug/0/0=vmm serial/0/0=vmm test-irq/1/0=vmm",
        ]
    );
}

#[test]
fn qtest_shows_the_delivery_path_change_on_a_live_source() {
    use std::io::{BufRead, BufReader};
    let mut child = spawn_piped(&["run", "--accel", "qtest", "--test-sources"]);
    let mut w = child.stdin.take().unwrap();
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    };
    writeln!(w, "irq_intercept_in ioapic\nhcall 0x10 0x40 0\nhcall 0x11 2").unwrap();
    assert_eq!((line(), line()), ("OK".into(), "OK 0x0 0x18 0x0 0x0".into()));
    // Forwarded: the (emulated) irqfd raises GSI 24, asynchronously: its line may come
    // before or after the FIRE call's answer.
    let mut two = [line(), line()];
    two.sort();
    assert_eq!(two, ["IRQ raise 24".to_string(), "OK 0x0 0x0 0x0 0x0".to_string()]);
    // Switch to VMM delivery while the source is live, then acknowledge: the next
    // interrupt is injected by the VMM as an MSI.
    writeln!(w, "irq_unforward test-irq 1 0\noutb 0xf9 1").unwrap();
    let mut seen = vec![line(), line(), line()];
    seen.sort();
    assert_eq!(seen, vec!["IRQ msi 0xfee00000 0x40", "OK", "OK"]);
    writeln!(w, "outb 0xf9 1").unwrap();
    assert_eq!(line(), "OK");
    drop(w);
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn bench_irq_reports_both_modes_and_who_delivered() {
    vmm::require_kvm!();
    let (_, v) = bench_json(&["irq", "--interrupts", "300"]);
    let figs = v["figures"].as_array().unwrap();
    assert_eq!(figs[0]["mode"], "forwarded");
    assert_eq!(figs[0]["vmm_delivered"], 0, "KVM delivered every forwarded interrupt");
    assert_eq!(figs[1]["mode"], "vmm");
    assert_eq!(figs[1]["vmm_delivered"], 300, "the VMM injected every interrupt in vmm mode");
    for f in figs {
        assert!(f["rate_per_s"].as_f64().unwrap() > 0.0);
    }
}
