//! Helpers shared by the command-line tests: run the built `passthru`, read its output.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

/// A command for the `passthru` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_passthru"))
}

/// Runs `cmd` to completion within `within`; past it the process is killed and the
/// test fails with what it printed (a hung guest must not hang the test suite).
pub fn output_within(cmd: &mut Command, within: std::time::Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_within(child, within)
}

/// Waits for `child` (its standard output and error piped) within `within`, as
/// [`output_within`] does.
pub fn wait_within(mut child: Child, within: std::time::Duration) -> Output {
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (stdout, stderr) = (o.join().unwrap(), e.join().unwrap());
    let Some(status) = status else {
        panic!("still running after {within:?}, killed: {}{}", text(&stdout), text(&stderr));
    };
    Output { status, stdout, stderr }
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
/// printed table and the parsed JSON (the file is removed). One run unless `args` say
/// `--runs`.
pub fn bench_json(args: &[&str]) -> (String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("passthru-{}-{}.json", args[0], std::process::id()));
    let mut cmd = bin();
    cmd.arg("bench").args(args).arg("--json").arg(&json);
    if !args.contains(&"--runs") {
        cmd.args(["--runs", "1"]);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (text(&out.stdout), v)
}

/// Bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// PCI through qtest memory commands, as a guest driver (or QEMU's libqos) does it:
/// ECAM addresses, decoding and bus mastering, MSI-X vectors.
pub mod qpci {
    use abi::pci::{cap, command, reg};

    /// The requester id of the first device passthru plugs (slot 1): its pvdma id.
    pub const FIRST_BDF: u16 = abi::pci::bdf(0, 1, 0);
    /// Where the first device's first BAR lands (the base of the 32-bit window).
    pub const FIRST_BAR0: u64 = abi::pci::MMIO32_BASE;

    /// ECAM address of `reg` of the function in `slot`.
    pub fn cfg(slot: u8, reg: u16) -> u64 {
        abi::pci::ECAM_BASE + (u64::from(slot) << 15) + u64::from(reg)
    }

    /// The value of a qtest read reply ("OK 0x...").
    pub fn value(reply: &str) -> u64 {
        let hex = reply.strip_prefix("OK 0x").unwrap_or_else(|| panic!("not a read reply: {reply}"));
        u64::from_str_radix(hex, 16).unwrap()
    }

    /// Turns memory decoding and bus mastering on.
    pub fn enable(cmd: &mut dyn FnMut(&str) -> String, slot: u8) {
        let v = value(&cmd(&format!("readw {:#x}", cfg(slot, reg::COMMAND))));
        let v = v | u64::from(command::MEMORY | command::MASTER);
        assert_eq!(cmd(&format!("writew {:#x} {v:#x}", cfg(slot, reg::COMMAND))), "OK");
    }

    /// The address memory BAR `i` decodes at.
    pub fn bar(cmd: &mut dyn FnMut(&str) -> String, slot: u8, i: u8) -> u64 {
        let at = reg::BAR0 + 4 * u16::from(i);
        let lo = value(&cmd(&format!("readl {:#x}", cfg(slot, at))));
        let mut a = lo & u64::from(abi::pci::bar::MEM_MASK);
        if lo as u32 & abi::pci::bar::MEM_TYPE_MASK == abi::pci::bar::MEM_TYPE_64 {
            a |= value(&cmd(&format!("readl {:#x}", cfg(slot, at + 4)))) << 32;
        }
        a
    }

    /// The offset of capability `id`.
    pub fn capability(cmd: &mut dyn FnMut(&str) -> String, slot: u8, id: u8) -> Option<u16> {
        let mut at = value(&cmd(&format!("readb {:#x}", cfg(slot, reg::CAPABILITIES)))) as u16;
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            if value(&cmd(&format!("readb {:#x}", cfg(slot, at)))) as u8 == id {
                return Some(at);
            }
            at = value(&cmd(&format!("readb {:#x}", cfg(slot, at + 1)))) as u16 & !3;
        }
        None
    }

    /// Programs MSI-X vector `v` to (`address`, `data`), unmasked, and enables MSI-X.
    pub fn msix_vector(cmd: &mut dyn FnMut(&str) -> String, slot: u8, v: u16, address: u64, data: u32) {
        let c = capability(cmd, slot, cap::MSIX).expect("an MSI-X capability");
        let table = value(&cmd(&format!("readl {:#x}", cfg(slot, c + 4))));
        let base = bar(cmd, slot, (table as u32 & cap::MSIX_BIR) as u8) + (table & !u64::from(cap::MSIX_BIR));
        let e = base + u64::from(v) * cap::MSIX_ENTRY_SIZE;
        for (off, val) in [(0, address & 0xffff_ffff), (4, address >> 32), (8, u64::from(data)), (12, 0)] {
            assert_eq!(cmd(&format!("writel {:#x} {val:#x}", e + off)), "OK");
        }
        let ctl = value(&cmd(&format!("readw {:#x}", cfg(slot, c + 2))));
        let ctl = (ctl | u64::from(cap::MSIX_ENABLE)) & !u64::from(cap::MSIX_MASKALL);
        assert_eq!(cmd(&format!("writew {:#x} {ctl:#x}", cfg(slot, c + 2))), "OK");
    }
}

/// A qtest session on a `passthru run --accel qtest` with `args`, its stderr discarded.
pub struct Q {
    pub child: std::process::Child,
    pub stdin: std::process::ChildStdin,
    pub out: std::io::BufReader<std::process::ChildStdout>,
}

impl Q {
    pub fn start(args: &[&str]) -> Q {
        let mut child = spawn_piped(&[&["run", "--accel", "qtest"][..], args].concat());
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        Q { child, stdin, out }
    }

    /// One command; IRQ lines are skipped.
    pub fn cmd(&mut self, c: &str) -> String {
        use std::io::BufRead;
        writeln!(self.stdin, "{c}").unwrap();
        loop {
            let mut l = String::new();
            assert!(self.out.read_line(&mut l).unwrap() > 0, "the VMM closed its output");
            if !l.starts_with("IRQ ") {
                return l.trim_end().to_string();
            }
        }
    }

    pub fn ok(&mut self, c: &str) {
        assert_eq!(self.cmd(c), "OK", "{c}");
    }

    /// The value of `key=` in the answer to `c`.
    pub fn field(&mut self, c: &str, key: &str) -> String {
        let a = self.cmd(c);
        a.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {a}"))
            .into()
    }

    /// Runs one descriptor on the engine whose registers are at `regs`, its ring of one
    /// at guest-physical `ring` (device address `ring_iova`), its record at `done`
    /// (device address in `d.completion`); returns the record's status.
    pub fn run_descriptor(
        &mut self,
        regs: u64,
        ring: u64,
        ring_iova: u64,
        done: u64,
        d: abi::dma_engine::Descriptor,
    ) -> u32 {
        run_descriptor(&mut |c| self.cmd(c), regs, ring, ring_iova, done, d)
    }

    pub fn end(mut self) {
        drop(self.stdin);
        assert_eq!(self.child.wait().unwrap().code(), Some(0));
    }
}

/// The answer to a TCE hypercall through qtest, "OK 0x0 CODE R1 R2" (the status says
/// the call reached the TCE block) -> (PAPR code, r1, r2).
pub fn papr(line: &str) -> (i64, u64, u64) {
    let w: Vec<u64> =
        line.split_whitespace().skip(1).map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap()).collect();
    assert_eq!(w[0], 0, "the call reached the TCE block: {line}");
    (w[1] as i64, w[2], w[3])
}

/// Runs one descriptor on the DMA engine whose registers are at `regs` through the
/// qtest commands `cmd` answers (a ring of 1 at `ring`, `ring_iova` as the engine
/// sees it, the record at `done`); returns its completion status.
pub fn run_descriptor(
    cmd: &mut dyn FnMut(&str) -> String,
    regs: u64,
    ring: u64,
    ring_iova: u64,
    done: u64,
    d: abi::dma_engine::Descriptor,
) -> u32 {
    use abi::dma_engine::{self as de, completion, regs as r};
    let mut ok = |c: &str| assert_eq!(cmd(c), "OK", "{c}");
    let hex: String = d.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    ok(&format!("write {ring:#x} 64 0x{hex}"));
    ok(&format!("memset {done:#x} 32 0"));
    ok(&format!("writel {:#x} {}", regs + r::CONTROL, de::control::RESET));
    ok(&format!("writeq {:#x} {ring_iova:#x}", regs + r::RING_BASE));
    ok(&format!("writel {:#x} 1", regs + r::RING_SIZE));
    ok(&format!("writel {:#x} {}", regs + r::CONTROL, de::control::ENABLE));
    ok(&format!("writel {:#x} 1", regs + r::TAIL));
    let t = std::time::Instant::now();
    loop {
        let s = qpci::value(&cmd(&format!("readl {done:#x}"))) as u32;
        if s != completion::PENDING {
            return s;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "the descriptor never completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// One qtest command served in this process on `vm` (a session of one line): its
/// answer.
pub fn qtest_cmd(vm: &vmm::Vm, line: &str) -> String {
    use std::sync::{Arc, Mutex};
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let shared: vmm::qtest::SharedOut = Arc::new(Mutex::new(Box::new(W(Arc::clone(&out)))));
    vmm::qtest::serve(vm, std::io::BufReader::new(format!("{line}\n").as_bytes()), shared).unwrap();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    text.lines().rfind(|l| !l.starts_with("IRQ ")).unwrap_or_default().to_string()
}

/// Saves `vm` (its devices given by `specs`: name -> `--device` text) to `dir`, and
/// restores it into a new VM of the same configuration (`config`): the snapshot's
/// devices attached again, their and their front-ends' state applied, running again.
pub fn snapshot_and_restore(
    vm: &vmm::Vm,
    dir: &std::path::Path,
    specs: &[(&str, &str)],
    config: vmm::VmConfig,
) -> vmm::Vm {
    let spec = |n: &str| specs.iter().find(|(name, _)| *name == n).map(|(_, s)| s.to_string());
    vmm::snapshot::save(vm, dir, &spec).unwrap();
    let snap = vmm::snapshot::Snapshot::load(dir).unwrap();
    let vm2 = vmm::Vm::new(config).unwrap();
    let devices: Vec<_> =
        snap.state.layout.devices.iter().map(|d| passthru::device::parse_device(&d.spec).unwrap()).collect();
    passthru::run::restore_into(&vm2, &snap, &devices, &|| {}).unwrap();
    snap.start(&vm2).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    vm2
}
