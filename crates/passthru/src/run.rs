//! `passthru run`.

use clap::{Args, ValueEnum};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use vmm::qtest::{self, End, SharedOut};
use vmm::{AccelKind, Vm, VmConfig};

/// The built-in default guest program of `passthru run`: the paravirtual DMA demo.
pub const DEFAULT_GUEST: &str = "pvdma";
/// Built-in guest programs that drive the test interrupt sources.
const NEEDS_TEST_SOURCES: [&str; 3] = ["interrupts", "irqstorm", "intx"];
/// The device the default guest gets when no `--device` is given.
pub const DEFAULT_DEVICE: &str = "dma-engine,dma=pvdma";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
/// What runs the machine.
pub enum Accel {
    /// KVM with one vCPU running a guest program.
    Kvm,
    /// No vCPU: the machine is driven through the qtest port (standard input or --qtest).
    Qtest,
}

#[derive(Args, Debug)]
/// `passthru run` arguments.
pub struct RunArgs {
    /// Guest program: a built-in name (see `passthru guests`) or the path of an ELF file.
    #[arg(long, default_value = DEFAULT_GUEST)]
    guest: String,
    /// Guest RAM: bytes or a size with K, M or G suffix.
    #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
    memory: u64,
    /// What runs the machine.
    #[arg(long, value_enum, default_value_t = Accel::Kvm)]
    accel: Accel,
    /// Serve the qtest protocol on a Unix socket at PATH instead of standard input
    /// (implies --accel qtest). passthru listens and takes one connection.
    #[arg(long, value_name = "PATH")]
    qtest: Option<PathBuf>,
    /// How device interrupts are delivered: forwarded (KVM irqfd, no VMM work per
    /// interrupt) or vmm (the VMM's delivery thread injects each one). Switchable per
    /// source at run time through the qtest port (irq_mode).
    #[arg(long, default_value = "forwarded", value_parser = parse_irq_mode)]
    irq_mode: irq::Mode,
    /// A number handed to the guest program (repeat for up to 4; see each program's
    /// description in `passthru guests`).
    #[arg(long = "guest-arg", value_name = "N", value_parser = parse_u64)]
    guest_args: Vec<u64>,
    /// Assign a PCI device: dma-engine[,dma=FRONTEND][,iommu-mode=shared|messages]
    /// [,process=child|inline][,timeout=T][,coherent=false][,enforce-snoop=off], or
    /// vfio-user,socket=PATH[,...] for a running server; FRONTEND: identity (default),
    /// pvdma, tce (with group=N, window=SIZE, page=SIZE), virtio-iommu (a virtio-iommu
    /// the guest's driver programs; docs/virtio-iommu.md). `--device help` lists every
    /// kind and option with its default. Repeatable.
    #[arg(long = "device", value_name = "SPEC", value_parser = crate::device::parse_device)]
    devices: Vec<crate::device::DeviceArg>,
    /// Locked-memory limit for memory pinned for DMA (default: RLIMIT_MEMLOCK).
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    locked_memory: Option<u64>,
    /// Print the DMA front-ends' and devices' counters at the end of the run.
    #[arg(long)]
    stats: bool,
    /// The guest-physical range devices may address without a guest IOMMU (the PCI
    /// bus's upstream window): START-END, e.g. 0-0x100000000. RAM outside it is not
    /// reachable by devices (reported at start). Default: the whole 48-bit space.
    #[arg(long, value_name = "START-END", value_parser = parse_window)]
    dma_window: Option<std::ops::Range<u64>>,
    /// What the VMM does before reading guest memory a non-coherent device may have
    /// written (dumps, snapshots): flush exactly the flagged ranges first, or refuse
    /// while a non-coherent device is attached.
    #[arg(long, value_name = "flush|refuse", default_value = "flush", value_parser = parse_nc)]
    noncoherent_migration: vmm::NonCoherentReads,
    /// Build the test interrupt sources (on by default for the interrupts, irqstorm
    /// and intx guest programs, which need them).
    #[arg(long)]
    test_sources: bool,
    /// End the VM when the guest calls a DMA front-end (paravirtual DMA, TCE...) with
    /// invalid arguments (by default it gets an error status and goes on).
    #[arg(long, alias = "pvdma-kill-on-misuse")]
    dma_kill_on_misuse: bool,
    /// Serve the control API (HTTP/1.1, JSON) on a Unix socket at PATH, mode 0600:
    /// `passthru ctl PATH ...` and `passthru stat PATH` talk to it.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write the VM's events (as `GET /api/v1/events` streams them: one JSON object per
    /// line) to PATH (appended), or to descriptor N with fd=N.
    #[arg(long, value_name = "PATH|fd=N")]
    event_monitor: Option<String>,
    /// Restore the VM saved in DIR (control API vm.snapshot) and let it go on from
    /// where it was: its RAM, devices (attached again as recorded; --device, if
    /// given, must list the same ones), DMA domains, interrupts and vCPU. With
    /// --accel qtest, a snapshot saved under qtest (no vCPU) is driven again.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["guest", "qtest", "memory"])]
    restore: Option<PathBuf>,
    /// Boot a Linux kernel instead of a guest program: a bzImage (the 64-bit boot
    /// protocol) or an ELF vmlinux (its PVH entry), with an e820 map from the memory
    /// map, ACPI tables (RSDP, XSDT, FADT, MADT, MCFG, DSDT with PCI hot-plug, VIOT), the
    /// console on COM1 (ttyS0). See README's "Running Linux".
    #[arg(long, value_name = "FILE", conflicts_with_all = ["guest", "guest_args", "restore", "qtest"])]
    kernel: Option<PathBuf>,
    /// An initramfs for --kernel, placed as high in low RAM as the kernel allows.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// The kernel command line (default: console=ttyS0 earlyprintk=serial,ttyS0,115200
    /// no_timer_check panic=-1).
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    cmdline: Option<String>,
    /// Write every request the guest makes to its virtio-iommu to FILE, one line each
    /// with the status it got (the trace `passthru replay virtio-iommu FILE` reads).
    /// Needs a device behind it (--device ...,dma=virtio-iommu).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    api::command::parse_number(s).ok_or_else(|| format!("'{s}' is not a number"))
}

fn parse_window(s: &str) -> Result<std::ops::Range<u64>, String> {
    let bad = || format!("'{s}' is not a window: write START-END, e.g. 0-0x100000000");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (parse_u64(a).map_err(|_| bad())?, parse_u64(b).map_err(|_| bad())?);
    if a >= b || a % 4096 != 0 || b % 4096 != 0 {
        return Err(format!("--dma-window {s}: START must be below END, both aligned to 4 KiB"));
    }
    Ok(a..b)
}

fn parse_nc(s: &str) -> Result<vmm::NonCoherentReads, String> {
    s.parse()
}

fn parse_irq_mode(s: &str) -> Result<irq::Mode, String> {
    s.parse()
}

/// A device a built-in guest program cannot do its job without.
struct Need {
    /// The `--device` that gives it.
    device: &'static str,
    /// How many.
    count: usize,
    /// Whether a given `--device` is one (a `vfio-user` server could be any device:
    /// one whose front-end fits counts).
    fits: fn(&crate::device::DeviceArg) -> bool,
}

/// What built-in guest `guest` run with `args` needs (nothing for a program of the
/// user's own: passthru cannot know).
fn needs(guest: &str, args: &[u64]) -> Vec<Need> {
    use crate::device::DeviceArg as D;
    fn engine_on(d: &D, fe: &str) -> bool {
        matches!(d, D::DmaEngine { .. } | D::VfioUser { .. }) && d.frontend() == fe
    }
    let arg0 = args.first().copied().unwrap_or(0);
    let one = |device, fits| vec![Need { device, count: 1, fits }];
    match guest {
        "pvdma" => one("dma-engine,dma=pvdma", |d| engine_on(d, "pvdma")),
        "dma" => one("dma-engine", |d| engine_on(d, "identity")),
        "noncoherent" => one("dma-engine,enforce-snoop=off", |d| match d {
            D::DmaEngine { options, .. } | D::VfioUser { options, .. } => !options.enforce_snoop,
            D::IntxTest { .. } => false,
        }),
        "tce" => one("dma-engine,dma=tce", |d| engine_on(d, "tce")),
        "p2p" => vec![Need { device: "dma-engine", count: 2, fits: |d| engine_on(d, "identity") }],
        "exits" if arg0 == 1 => {
            vec![Need {
                device: "dma-engine",
                count: 2,
                fits: |d| matches!(d, D::DmaEngine { .. } | D::VfioUser { .. }),
            }]
        }
        "pci" if arg0 == 1 => one("intx-test", |d| matches!(d, D::IntxTest { .. } | D::VfioUser { .. })),
        _ => Vec::new(),
    }
}

/// Checks that `devices` give built-in guest `guest` what it needs: an error naming the
/// `--device` to add otherwise.
fn check_needs(guest: &str, args: &[u64], devices: &[crate::device::DeviceArg]) -> Result<(), String> {
    for n in needs(guest, args) {
        let have = devices.iter().filter(|d| (n.fits)(d)).count();
        if have < n.count {
            let times = if n.count > 1 { format!("{} of ", n.count) } else { String::new() };
            return Err(format!(
                "the {guest} guest needs {times}--device {} (it has {have}): add it (passthru guests says what each \
                 program needs)",
                n.device
            ));
        }
    }
    Ok(())
}

/// The machine `args` describe.
fn config(args: &RunArgs, accel: AccelKind) -> VmConfig {
    let mut config = VmConfig::new(accel);
    config.memory = args.memory;
    config.irq_mode = args.irq_mode;
    config.locked_memory = args.locked_memory;
    config.dma_kill_on_misuse = args.dma_kill_on_misuse;
    config.test_sources =
        args.test_sources || (accel == AccelKind::Kvm && NEEDS_TEST_SOURCES.contains(&args.guest.as_str()));
    if let Some(w) = &args.dma_window {
        config.dma_window = w.clone();
    }
    config.noncoherent_reads = args.noncoherent_migration;
    // The front-ends the devices name, built with the VM (in order, each once).
    for d in &args.devices {
        let f = d.frontend().to_string();
        if !config.frontends.contains(&f) {
            config.frontends.push(f);
        }
    }
    config
}

/// Without `--locked-memory`, raises RLIMIT_MEMLOCK to what `memory` bytes of RAM and
/// the devices need, when the process may (see [`crate::memlock`]).
fn ensure_locked_memory(args: &RunArgs, memory: u64, devices: &[crate::device::DeviceArg]) {
    if args.locked_memory.is_some() {
        return;
    }
    let need = crate::memlock::needed(memory, devices, args.api_socket.is_some());
    match crate::memlock::raise_to(need) {
        Ok(Some(line)) => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        Ok(None) => {}
        // Only an identity domain (or virtio-iommu's bypass, an identity domain too)
        // cannot work below the need; the others pin on demand.
        Err(why) if devices.iter().any(|d| ["identity", "virtio-iommu"].contains(&d.frontend())) => {
            let _ = writeln!(std::io::stderr(), "passthru: {why}");
        }
        Err(_) => {}
    }
}

/// Starts recording the virtio-iommu's requests when `--record FILE` was given.
fn start_recording(args: &RunArgs, vm: &Vm) -> Result<(), String> {
    let Some(path) = &args.record else { return Ok(()) };
    let fe = vm.frontends().get(iommu::viommu::REGISTRATION.name).ok_or_else(|| {
        "--record records a virtio-iommu's requests: give a device behind one (--device dma-engine,dma=virtio-iommu)"
            .to_string()
    })?;
    let q = fe.queries().ok_or("the virtio-iommu answers no queries")?;
    q.query("record", &path.display().to_string()).map_err(|e| format!("--record: {e}"))?;
    Ok(())
}

/// The control API server for `vm`, when `--api-socket` was given.
fn start_api(args: &RunArgs, vm: &Arc<Vm>, specs: &crate::control::Specs) -> Result<Option<api::Server>, String> {
    let Some(path) = &args.api_socket else { return Ok(None) };
    let control = crate::control::Control::new(Arc::clone(vm), Arc::clone(specs));
    let server = api::Server::start(path, Arc::new(control))?;
    let _ = writeln!(
        std::io::stderr(),
        "passthru: control API on {} (passthru ctl {} info)",
        path.display(),
        path.display()
    );
    Ok(Some(server))
}

/// Where the signal thread finds the VM to stop (none yet: it exits at once).
#[derive(Clone, Default)]
struct StopSlot(Arc<Mutex<Option<std::sync::Weak<Vm>>>>);

impl StopSlot {
    /// From now on a signal stops `vm` in order.
    fn set(&self, vm: &Arc<Vm>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(vm));
    }
}

/// SIGINT, SIGTERM and SIGHUP stop the VM in order (see [`crate::signals`]); before
/// the VM exists, at once.
fn watch_signals(args: &RunArgs) -> Result<StopSlot, String> {
    crate::signals::block();
    let slot = StopSlot::default();
    // The socket files this process made, removed by a stop at once.
    let files: Vec<PathBuf> = args.api_socket.iter().chain(&args.qtest).cloned().collect();
    let (s, remove) = (slot.clone(), files.clone());
    crate::signals::watch("stopping the VM in order", files, move |status| {
        let vm = s.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(std::sync::Weak::upgrade);
        match vm {
            Some(vm) => vm.request_exit(status),
            None => {
                for p in &remove {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(i32::from(status));
            }
        }
    })?;
    Ok(slot)
}

/// The `--event-monitor` thread: dropping this waits (at most a second) for it to have
/// written the last events (it ends once the VM is gone).
struct Monitor(Option<std::sync::mpsc::Receiver<()>>);

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            let _ = done.recv_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// With `--event-monitor`: a thread (`event-monitor`) writing every event of `vm` as a
/// JSON line, from the moment it is called (start it right after the VM is built).
fn start_event_monitor(args: &RunArgs, vm: &Vm) -> Result<Monitor, String> {
    use std::os::fd::FromRawFd;
    let Some(to) = &args.event_monitor else { return Ok(Monitor(None)) };
    let mut out: std::fs::File = match to.strip_prefix("fd=") {
        Some(n) => {
            let fd: i32 = n.parse().map_err(|_| format!("--event-monitor {to}: fd=N takes a descriptor number"))?;
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("--event-monitor {to}: descriptor {fd} is not open (or is a standard one)"));
            }
            // SAFETY: an open descriptor the operator handed to this process for this use;
            // it is owned from here on.
            unsafe { std::fs::File::from_raw_fd(fd) }
        }
        None => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(to)
            .map_err(|e| format!("--event-monitor {to}: {e}"))?,
    };
    let rx = vm.subscribe_events();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("event-monitor".into())
        .spawn(move || {
            for line in rx {
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
            let _ = done.send(());
        })
        .map(|_| Monitor(Some(finished)))
        .map_err(|e| format!("--event-monitor: cannot start its thread: {e}"))
}

/// Runs a machine until its guest exits (KVM) or its driver leaves (qtest), or a
/// signal stops it.
pub fn run(args: RunArgs) -> Result<ExitCode, String> {
    let stop = watch_signals(&args)?;
    if let Some(dir) = &args.restore {
        return run_restore(&args, dir, &stop);
    }
    if args.qtest.is_some() || args.accel == Accel::Qtest {
        return run_qtest(&args, &stop);
    }
    if let Some(kernel) = &args.kernel {
        return run_kernel(&args, kernel, &stop);
    }
    let elf = guests::load(&args.guest)?;
    // The paravirtual DMA demo needs its device: give it the default one.
    let default_device;
    let devices = if args.devices.is_empty() && args.guest == DEFAULT_GUEST {
        default_device = [crate::device::parse_device(DEFAULT_DEVICE)?];
        &default_device[..]
    } else {
        &args.devices[..]
    };
    // A built-in program that would only fail after booting: say what to add, exit 2.
    if let Err(why) = check_needs(&args.guest, &args.guest_args, devices) {
        eprintln!("passthru: error: {why}");
        return Ok(ExitCode::from(2));
    }
    ensure_locked_memory(&args, args.memory, devices);
    let vm = Arc::new(Vm::new(config(&args, AccelKind::Kvm)).map_err(|e| e.to_string())?);
    stop.set(&vm);
    let _monitor = start_event_monitor(&args, &vm)?;
    let specs = attach_devices(&vm, devices)?;
    start_recording(&args, &vm)?;
    let api = start_api(&args, &vm, &specs)?;
    let status = vm.run_guest_with_args(&elf, &args.guest_args).map_err(|e| e.to_string());
    drop(api); // no request runs after this
    let status = status?;
    let _ = std::io::stdout().flush();
    report_test_sources(&vm);
    report_guest_throughput(&vm);
    if args.stats || args.guest == DEFAULT_GUEST {
        report_stats(&vm);
    }
    drop(vm); // devices removed, their processes reaped
    Ok(ExitCode::from(status))
}

/// `run --kernel`: a Linux kernel with the devices asked for.
fn run_kernel(args: &RunArgs, kernel: &std::path::Path, stop: &StopSlot) -> Result<ExitCode, String> {
    let read = |p: &std::path::Path, what: &str| std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()));
    let k = vmm::linux::Kernel {
        image: read(kernel, "--kernel")?,
        initramfs: args.initramfs.as_deref().map(|p| read(p, "--initramfs")).transpose()?,
        cmdline: args.cmdline.clone().unwrap_or_else(|| vmm::linux::DEFAULT_CMDLINE.to_string()),
    };
    ensure_locked_memory(args, args.memory, &args.devices);
    let vm = Arc::new(Vm::new(config(args, AccelKind::Kvm)).map_err(|e| e.to_string())?);
    stop.set(&vm);
    let _monitor = start_event_monitor(args, &vm)?;
    let specs = attach_devices(&vm, &args.devices)?;
    start_recording(args, &vm)?;
    let api = start_api(args, &vm, &specs)?;
    let status = vm.run_kernel(&k).map_err(|e| e.to_string());
    drop(api);
    let _ = std::io::stdout().flush();
    if args.stats {
        report_stats(&vm);
    }
    let status = status?;
    drop(vm);
    Ok(ExitCode::from(status))
}

/// Brings a new VM (built with the snapshot's RAM size) to the snapshot's state: RAM
/// written, `devices` (the snapshot's, parsed) attached with their saved names and
/// slots, their state and their front-ends' state applied; each device is left
/// stopped until [`vmm::snapshot::Snapshot::start`]. `step` is called after RAM and
/// after the devices. Returns the devices' specifications (for the control API).
pub fn restore_into(
    vm: &Vm,
    snap: &vmm::snapshot::Snapshot,
    devices: &[crate::device::DeviceArg],
    step: &dyn Fn(),
) -> Result<crate::control::Specs, String> {
    snap.apply_ram(vm).map_err(|e| e.to_string())?;
    step();
    let specs = crate::control::Specs::default();
    for (d, arg) in snap.state.layout.devices.iter().zip(devices) {
        crate::device::attach_as(vm, arg, Some(&d.name), Some(d.slot))?;
        specs.lock().unwrap_or_else(|e| e.into_inner()).insert(d.name.clone(), arg.spec());
    }
    snap.apply_devices(vm).map_err(|e| e.to_string())?;
    step();
    Ok(specs)
}

/// `passthru run --restore DIR`: everything is checked before the VM is built; the
/// devices come back with their names and slots.
fn run_restore(args: &RunArgs, dir: &Path, stop: &StopSlot) -> Result<ExitCode, String> {
    let span = tracing::info_span!("restore", dir = %dir.display()).entered();
    let qtest = args.accel == Accel::Qtest || args.qtest.is_some();
    // Progress on a terminal (hidden otherwise): check, RAM, devices.
    let bar = crate::progress::bar(3, "restoring");
    let snap = vmm::snapshot::Snapshot::load(dir).map_err(|e| e.to_string())?;
    bar.inc(1);
    let devices = snap
        .state
        .layout
        .devices
        .iter()
        .map(|d| {
            let arg =
                crate::device::parse_device(&d.spec).map_err(|e| format!("the snapshot's device {}: {e}", d.name))?;
            if arg.frontend() != d.frontend {
                return Err(format!(
                    "the snapshot's device {}: its DMA front-end is {} by its specification, {} in its state",
                    d.name,
                    arg.frontend(),
                    d.frontend
                ));
            }
            Ok(arg)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if !args.devices.is_empty() && args.devices != devices {
        let list: Vec<String> = devices.iter().map(|d| d.spec()).collect();
        return Err(format!(
            "--device differs from the snapshot's devices ({}): drop --device, or give exactly those",
            list.join("; ")
        ));
    }
    if !qtest && !snap.state.layout.vcpu {
        return Err(format!("{} holds no vCPU (saved under qtest): restore it with --accel qtest", dir.display()));
    }
    let mut cfg = config(args, if qtest { AccelKind::Qtest } else { AccelKind::Kvm });
    cfg.memory = snap.state.layout.memory;
    cfg.test_sources |= snap.state.layout.test_sources;
    if qtest && args.qtest.is_none() {
        cfg.serial_out = Box::new(std::io::stderr());
    }
    ensure_locked_memory(args, snap.state.layout.memory, &devices);
    let vm = Arc::new(Vm::new(cfg).map_err(|e| e.to_string())?);
    stop.set(&vm);
    let _monitor = start_event_monitor(args, &vm)?;
    let specs = restore_into(&vm, &snap, &devices, &|| bar.inc(1))?;
    start_recording(args, &vm)?;
    bar.finish_and_clear();
    vm.events().publish(vmm::events::Event::Restored { dir: dir.display().to_string() });
    tracing::info!(devices = devices.len(), "restored");
    drop(span);
    let _ = writeln!(std::io::stderr(), "passthru: restored {} ({} device(s))", dir.display(), devices.len());
    let api = start_api(args, &vm, &specs)?;
    if qtest {
        // No vCPU: the devices run again and the driver takes over.
        snap.start(&vm).map_err(|e| e.to_string())?;
        let out: SharedOut = Arc::new(Mutex::new(Box::new(std::io::stdout())));
        let lines = read_lines(BufReader::new(std::io::stdin()))?;
        let end = qtest::serve_channel(&vm, lines, out).map_err(|e| e.to_string());
        stopping(&vm, &end);
        drop(api);
        drop(vm);
        return Ok(match end? {
            End::Eof => ExitCode::SUCCESS,
            End::Exit(status) => ExitCode::from(status),
        });
    }
    let status = vm.run_restored(&snap).map_err(|e| e.to_string());
    drop(api);
    let status = status?;
    let _ = std::io::stdout().flush();
    report_test_sources(&vm);
    report_guest_throughput(&vm);
    if args.stats {
        report_stats(&vm);
    }
    drop(vm);
    Ok(ExitCode::from(status))
}

/// Guest programs that move data mark their start (tag 0xd0) and end (0xd1 with the
/// bytes moved, 0xd2 with the descriptors): the VMM turns the marks into rates.
fn report_guest_throughput(vm: &Vm) {
    let marks = vm.bench().marks();
    let find = |tag| marks.iter().find(|m| m.0 == tag);
    if let (Some(start), Some(end)) = (find(0xd0), find(0xd1)) {
        let secs = end.2.duration_since(start.2).as_secs_f64().max(1e-9);
        let descriptors = find(0xd2).map_or(0, |m| m.1);
        let _ = writeln!(
            std::io::stderr(),
            "passthru: guest DMA throughput: {} bytes in {:.1} ms = {:.1} MiB/s, {:.0} descriptors/s",
            end.1,
            secs * 1e3,
            end.1 as f64 / secs / f64::from(1u32 << 20),
            descriptors as f64 / secs
        );
    }
}

/// The one-screen summary on standard error (`--stats`).
fn report_stats(vm: &Vm) {
    let _ = std::io::stderr().write_all(stats_report(vm).as_bytes());
}

/// The one-screen summary: each DMA front-end's counters, devices' faults and
/// interrupts.
pub fn stats_report(vm: &Vm) -> String {
    let mut err = Vec::new();
    let mut quiet = Vec::new();
    for fe in vm.frontends().all() {
        let stats = fe.stats();
        // A front-end nothing used (every number 0) gets a name in one line, not a row of zeros.
        let zero = |v: &iommu::StatValue| matches!(v, iommu::StatValue::Total(0) | iommu::StatValue::Gauge(0));
        if stats.iter().all(|(_, v)| zero(v)) {
            quiet.push(fe.name().to_string());
            continue;
        }
        let _ = writeln!(err, "passthru: DMA front-end {}: {stats}", fe.name());
        if stats.get("over_locked_limit").is_some() {
            let limit = vm.dma().account().limit();
            let _ = writeln!(
                err,
                "passthru: the guest's DMA mappings hit the VM's locked-memory limit ({} KiB); \
                 raise it with --locked-memory SIZE (e.g. --locked-memory 16M) or `ulimit -l`",
                limit >> 10
            );
        }
    }
    if !quiet.is_empty() {
        let _ = writeln!(err, "passthru: DMA front-ends unused: {}", quiet.join(", "));
    }
    for d in vm.devices() {
        let ep = d.endpoint();
        let f = ep.faults();
        let last = f.recent().last().map(|x| format!(" (last {:#x})", x.iova.0)).unwrap_or_default();
        let prefix = format!("{}/", d.name());
        let sources: Vec<String> = vm
            .irqs()
            .sources()
            .iter()
            .filter(|id| id.to_string().starts_with(&prefix))
            .filter_map(|id| vm.irqs().stats(id).map(|s| format!("{id} {} ({} by the VMM)", s.mode, s.vmm_delivered)))
            .collect();
        let _ = writeln!(
            err,
            "passthru: device {} ({}): {} DMA mappings left, {} DMA faults seen by the VMM{last}, interrupts {} [{}]",
            d.name(),
            d.bdf_string(),
            d.function().domain().map_or(0, |x| x.mapping_count()),
            f.total(),
            d.function().irq_mode(),
            sources.join(", ")
        );
    }
    let nc = vm.device_manager().noncoherent();
    let _ = writeln!(
        err,
        "passthru: non-coherent DMA: {} device(s) now [{}], {} transition(s), {} bytes flushed before VMM reads",
        nc.count(),
        nc.devices().join(", "),
        nc.transitions(),
        vmm::flush::flushed_bytes()
    );
    for (r, flagged, t) in vm.memory_types() {
        if flagged {
            let _ = writeln!(
                err,
                "passthru: slot {:#x}+{:#x} non-coherent: guest PAT WB -> {}, WC -> {} (per-slot model; today's VM-wide kernels: {} / {})",
                r.gpa, r.size, t[0], t[1], t[2], t[3]
            );
        }
    }
    String::from_utf8_lossy(&err).into_owned()
}

/// Attaches every `--device` (the VMM owns the processes it spawns); returns each
/// one's name and `--device` text.
fn attach_devices(vm: &Vm, devices: &[crate::device::DeviceArg]) -> Result<crate::control::Specs, String> {
    let specs = crate::control::Specs::default();
    for d in devices {
        let dev = crate::device::attach(vm, d)?;
        specs.lock().unwrap_or_else(|e| e.into_inner()).insert(dev.name().to_string(), d.spec());
    }
    Ok(specs)
}

/// Tells what the test interrupt sources did, when a guest used them (stderr, so the
/// guest's own output stays clean).
fn report_test_sources(vm: &Vm) {
    let Some(t) = vm.test_sources() else { return };
    for (name, s) in [("test-irq", t.msi.summary()), ("test-intx", t.intx.summary())] {
        if s.fired > 0 {
            // A closed stderr must not turn a finished run into a panic.
            let _ = writeln!(
                std::io::stderr(),
                "passthru: {name}: fired {}, guest counted {}, forwarding switches {}, resamples {}, timed out {}",
                s.fired,
                s.guest_counted.map_or("-".to_string(), |c| c.to_string()),
                s.toggles,
                s.resamples,
                if s.timed_out { "yes" } else { "no" }
            );
        }
    }
}

fn run_qtest(args: &RunArgs, stop: &StopSlot) -> Result<ExitCode, String> {
    let mut config = config(args, AccelKind::Qtest);
    ensure_locked_memory(args, args.memory, &args.devices);
    let end = match &args.qtest {
        Some(path) => {
            let listener = crate::device::listen_at(path).map_err(|e| {
                format!("cannot listen on {}: {e} (remove a stale socket file, or pick another path)", path.display())
            })?;
            let vm = Arc::new(Vm::new(config).map_err(|e| e.to_string())?);
            let _monitor = start_event_monitor(args, &vm)?;
            let specs = attach_devices(&vm, &args.devices)?;
            start_recording(args, &vm)?;
            let api = start_api(args, &vm, &specs)?;
            // Until a driver connects, a signal ends the process at once (the main
            // thread waits in accept).
            let accepted = listener.accept();
            stop.set(&vm);
            let _ = std::fs::remove_file(path);
            let (stream, _) = accepted.map_err(|e| format!("accepting on {}: {e}", path.display()))?;
            let writer = stream.try_clone().map_err(|e| e.to_string())?;
            let reader = stream.try_clone().map_err(|e| e.to_string())?;
            let out: SharedOut = Arc::new(Mutex::new(Box::new(writer)));
            let lines = read_lines(BufReader::new(reader))?;
            let end = qtest::serve_channel(&vm, lines, out).map_err(|e| e.to_string());
            stopping(&vm, &end);
            // Ends the reader thread if the session ended by vm.shutdown.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            drop(api);
            drop(vm);
            end?
        }
        None => {
            // Standard output carries the protocol: the guest console goes to stderr.
            config.serial_out = Box::new(std::io::stderr());
            let vm = Arc::new(Vm::new(config).map_err(|e| e.to_string())?);
            stop.set(&vm);
            let _monitor = start_event_monitor(args, &vm)?;
            let specs = attach_devices(&vm, &args.devices)?;
            start_recording(args, &vm)?;
            let api = start_api(args, &vm, &specs)?;
            let out: SharedOut = Arc::new(Mutex::new(Box::new(std::io::stdout())));
            let lines = read_lines(BufReader::new(std::io::stdin()))?;
            let end = qtest::serve_channel(&vm, lines, out).map_err(|e| e.to_string());
            stopping(&vm, &end);
            drop(api);
            drop(vm);
            end?
        }
    };
    Ok(match end {
        End::Eof => ExitCode::SUCCESS,
        End::Exit(status) => ExitCode::from(status),
    })
}

/// Says the VM stops as the qtest session ended (its status, or 0 at the end of the
/// driver's input).
fn stopping(vm: &Vm, end: &Result<End, String>) {
    match end {
        Ok(End::Exit(status)) => vm.stopping(*status),
        Ok(End::Eof) => vm.stopping(0),
        Err(_) => vm.stopping(1),
    }
}

/// A thread (`qtest-input`) that reads the driver's lines, so the session can also end
/// on an exit requested through the control API while the driver is silent. It ends
/// with its input; if the session ends first it stays blocked until process exit.
fn read_lines(
    input: impl std::io::BufRead + Send + 'static,
) -> Result<std::sync::mpsc::Receiver<std::io::Result<String>>, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    std::thread::Builder::new()
        .name("qtest-input".into())
        .spawn(move || {
            for line in input.lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the qtest input thread: {e}"))?;
    Ok(rx)
}
