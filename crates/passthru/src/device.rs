//! Assigned devices on the command line: `--device` specs, spawning device processes,
//! and `passthru device dma-engine` (the device side).

use clap::{Args, Subcommand};
use devices::process::DeviceProcess;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmm::device_manager::{AttachOptions, DEFAULT_DEVICE_TIMEOUT};
use vmm::{DeviceSpec, IommuMode, RemoteSpec, Vm};

/// A parsed `--device` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// `dma-engine[,dma=FRONTEND][,iommu-mode=shared|messages][,process=child|inline][,timeout=T]`
    DmaEngine {
        /// How a device process reaches guest memory.
        mode: IommuMode,
        /// In the VMM rather than in a child process.
        inline: bool,
        /// The DMA front-end that programs its domain (registered name).
        frontend: String,
        /// Deadline of every exchange with the device process.
        timeout: Duration,
        /// Coherency (`coherent=`, `enforce-snoop=`).
        options: AttachOptions,
    },
    /// `intx-test[,dma=FRONTEND]`: the INTx test device (`abi::test_device`), a model in
    /// the VMM; it does no DMA (its front-end defaults to pvdma: an empty domain, no
    /// pins).
    IntxTest {
        /// The DMA front-end its endpoint is handed to.
        frontend: String,
    },
    /// `vfio-user,socket=PATH[,dma=...][,iommu-mode=shared|messages][,timeout=T]`: a running server.
    VfioUser {
        /// The server's socket.
        socket: PathBuf,
        /// How it reaches guest memory.
        mode: IommuMode,
        /// The DMA front-end that programs its domain (registered name).
        frontend: String,
        /// Deadline of every exchange with the server.
        timeout: Duration,
        /// Coherency (`coherent=`, `enforce-snoop=`).
        options: AttachOptions,
    },
}

impl DeviceArg {
    /// The DMA front-end's name.
    pub fn frontend(&self) -> &str {
        match self {
            DeviceArg::DmaEngine { frontend, .. }
            | DeviceArg::VfioUser { frontend, .. }
            | DeviceArg::IntxTest { frontend } => frontend,
        }
    }

    /// The `--device` text that parses back to this (a snapshot records it to attach
    /// the device again).
    pub fn spec(&self) -> String {
        let (mut out, mode, frontend, timeout, options) = match self {
            DeviceArg::IntxTest { frontend } => return format!("intx-test,dma={frontend}"),
            DeviceArg::DmaEngine { mode, inline, frontend, timeout, options } => {
                let kind = if *inline { "dma-engine,process=inline" } else { "dma-engine" };
                (kind.to_string(), mode, frontend, timeout, options)
            }
            DeviceArg::VfioUser { socket, mode, frontend, timeout, options } => {
                (format!("vfio-user,socket={}", socket.display()), mode, frontend, timeout, options)
            }
        };
        out += &format!(",dma={frontend}");
        if *mode == IommuMode::Messages {
            out += ",iommu-mode=messages";
        }
        out += &format!(",timeout={}ms", timeout.as_millis());
        if !options.coherent {
            out += ",coherent=false";
        }
        if !options.enforce_snoop {
            out += ",enforce-snoop=off";
        }
        for (k, v) in &options.frontend_params {
            out += &format!(",{k}={v}");
        }
        out
    }

    /// A DMA engine with the default timeout.
    pub fn engine(mode: IommuMode, inline: bool, frontend: &str) -> DeviceArg {
        DeviceArg::DmaEngine {
            mode,
            inline,
            frontend: frontend.to_string(),
            timeout: DEFAULT_DEVICE_TIMEOUT,
            options: AttachOptions::default(),
        }
    }
}

/// Parses a duration: milliseconds with `ms`, seconds with `s` (or a bare number).
fn parse_duration(v: &str) -> Result<Duration, String> {
    let bad = || format!("timeout={v}: write e.g. timeout=500ms or timeout=5s");
    let d = if let Some(ms) = v.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else {
        Duration::from_secs(v.strip_suffix('s').unwrap_or(v).parse().map_err(|_| bad())?)
    };
    if d.is_zero() || d > Duration::from_secs(3600) { Err(bad()) } else { Ok(d) }
}

/// `passthru run --device help`: every device kind and option, with its default, and
/// every DMA front-end with the options it takes.
pub fn help() -> String {
    let mut o = String::from(
        "Devices (--device KIND[,OPTION=VALUE]...; repeat --device for more):\n\
         \n  dma-engine                 passthru's DMA engine (COPY, FILL, CRC32C, MSI-X): in a sandboxed\n\
         \x20                            process of its own (default) or in the VMM\n\
         \x20   process=child|inline     where it runs (default: child)\n\
         \x20   iommu-mode=shared|messages  how a device process reaches guest memory: the memfd\n\
         \x20                            (default: shared) or every access a checked message\n\
         \n  vfio-user,socket=PATH      any running vfio-user server (libvfio-user, SPDK, passthru device)\n\
         \x20   iommu-mode=shared|messages  as above (default: shared)\n\
         \n  intx-test                  the INTx test device (abi::test_device: a level-triggered line,\n\
         \x20                            function-level reset) in the VMM; takes dma= only (default:\n\
         \x20                            pvdma: it does no DMA, so nothing is pinned)\n\
         \nOptions of dma-engine and vfio-user:\n\
         \x20   dma=FRONTEND             who programs its DMA domain (default: identity; see below)\n\
         \x20   timeout=T                deadline of every exchange with a device process, e.g. 500ms, 5s\n\
         \x20                            (default: 5s); past it the device is declared gone\n\
         \x20   coherent=true|false      false: it does not snoop CPU caches (default: true)\n\
         \x20   enforce-snoop=on|off     off: the guest's No Snoop makes it non-coherent (default: on)\n\
         \nDMA front-ends (dma=NAME):\n",
    );
    for r in iommu::registry::registered() {
        o += &format!("\n  {:<26} {}\n", r.name, r.help);
        if !r.params.is_empty() && !r.help.contains("option") {
            o += &format!("  {:<26} options: {}\n", "", r.params.join(", "));
        }
    }
    o += "\nExamples:\n\
          \x20 --device dma-engine                           identity DMA, in its own process\n\
          \x20 --device dma-engine,dma=pvdma,process=inline  the guest maps its DMA, engine in the VMM\n\
          \x20 --device dma-engine,dma=tce,group=1,window=4G a TCE group with a 4 GiB default window\n\
          \x20 --device dma-engine,dma=virtio-iommu          behind the virtio-iommu the guest's driver programs\n\
          \x20 --device vfio-user,socket=/tmp/gpio.sock,iommu-mode=messages\n";
    o
}

/// Parses a `--device` value.
pub fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    if kind == "intx-test" {
        let mut frontend = "pvdma".to_string();
        for p in parts {
            match p.split_once('=') {
                Some(("dma", v)) => frontend = iommu::registry::parse_name(v)?,
                _ => return Err(format!("intx-test takes dma=FRONTEND only, not '{p}'")),
            }
        }
        return Ok(DeviceArg::IntxTest { frontend });
    }
    let (mut mode, mut inline, mut socket) = (IommuMode::SharedFd, false, None);
    let mut frontend = iommu::registry::default_name().to_string();
    let mut timeout = DEFAULT_DEVICE_TIMEOUT;
    let mut options = AttachOptions::default();
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("'{p}' in --device {s} is not key=value"))?;
        match k {
            "iommu-mode" => mode = v.parse()?,
            "process" => {
                inline = match v {
                    "inline" => true,
                    "child" => false,
                    _ => return Err(format!("process={v}: use process=child or process=inline")),
                }
            }
            "socket" => socket = Some(PathBuf::from(v)),
            "dma" => frontend = iommu::registry::parse_name(v)?,
            "timeout" => timeout = parse_duration(v)?,
            "coherent" => {
                options.coherent = match v {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("coherent={v}: use coherent=true or coherent=false")),
                }
            }
            "enforce-snoop" => {
                options.enforce_snoop = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("enforce-snoop={v}: use enforce-snoop=on or enforce-snoop=off")),
                }
            }
            _ => options.frontend_params.push((k.to_string(), v.to_string())),
        }
    }
    // Keys passthru does not know go to the DMA front-end, which must take them.
    let accepted = iommu::registry::find(&frontend).map(|r| r.params).unwrap_or(&[]);
    if let Some((k, _)) = options.frontend_params.iter().find(|(k, _)| !accepted.contains(&k.as_str())) {
        let theirs =
            if accepted.is_empty() { String::new() } else { format!("; dma={frontend} takes {}", accepted.join(", ")) };
        return Err(format!(
            "unknown --device option '{k}' (dma, iommu-mode, process, socket, timeout, coherent, enforce-snoop{theirs})"
        ));
    }
    match kind {
        "dma-engine" if socket.is_none() => {
            if inline && mode == IommuMode::Messages {
                return Err("iommu-mode=messages needs a device process; drop process=inline".into());
            }
            Ok(DeviceArg::DmaEngine { mode, inline, frontend, timeout, options })
        }
        "vfio-user" => match socket {
            Some(socket) if !inline => Ok(DeviceArg::VfioUser { socket, mode, frontend, timeout, options }),
            Some(_) => Err("a vfio-user device runs in its own process: drop process=inline".into()),
            None => Err("--device vfio-user needs socket=PATH of a running server".into()),
        },
        "dma-engine" => {
            Err("dma-engine takes no socket; for a running server use --device vfio-user,socket=PATH".into())
        }
        other => Err(format!(
            "unknown device '{other}': use dma-engine, intx-test or vfio-user,socket=PATH (see --device help)"
        )),
    }
}

/// Attaches one device to `vm`, spawning its process if needed (the VMM owns it then).
pub fn attach(vm: &Vm, arg: &DeviceArg) -> Result<std::sync::Arc<vmm::AssignedDevice>, String> {
    attach_as(vm, arg, None, None)
}

/// As [`attach`], with the device's name and slot given (a restore).
pub fn attach_as(
    vm: &Vm,
    arg: &DeviceArg,
    name: Option<&str>,
    slot: Option<u8>,
) -> Result<std::sync::Arc<vmm::AssignedDevice>, String> {
    let (spec, what, frontend, mut options) = match arg {
        DeviceArg::IntxTest { frontend } => (
            DeviceSpec::Local(Box::new(devices::intx_test::IntxTest::new())),
            "INTx test device in the VMM process".to_string(),
            frontend,
            AttachOptions::default(),
        ),
        DeviceArg::DmaEngine { inline: true, frontend, options, .. } => {
            (DeviceSpec::Inline, "dma-engine in the VMM process".to_string(), frontend, options.clone())
        }
        DeviceArg::DmaEngine { mode, frontend, timeout, options, .. } => {
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let process = spawn_engine(theirs)?;
            let what = format!("dma-engine in process {} over vfio-user, {}", process.pid(), mode_name(*mode));
            let spec = RemoteSpec { stream: ours, mode: *mode, process: Some(process), timeout: *timeout };
            (DeviceSpec::Remote(spec), what, frontend, options.clone())
        }
        DeviceArg::VfioUser { socket, mode, frontend, timeout, options } => {
            let stream = UnixStream::connect(socket)
                .map_err(|e| format!("connecting to the vfio-user server at {}: {e}", socket.display()))?;
            let what = format!("vfio-user server at {}, {}", socket.display(), mode_name(*mode));
            let spec = RemoteSpec { stream, mode: *mode, process: None, timeout: *timeout };
            (DeviceSpec::Remote(spec), what, frontend, options.clone())
        }
    };
    options.name = name.map(str::to_string);
    options.slot = slot;
    let dev = vm.attach_device_with(spec, frontend, options).map_err(|e| e.to_string())?;
    let f = dev.function();
    let id = pci::read32(f.as_ref(), abi::pci::reg::VENDOR_ID);
    eprintln!(
        "passthru: device {} at {} ({:04x}:{:04x}): {what}, DMA by {}",
        dev.name(),
        dev.bdf_string(),
        id & 0xffff,
        id >> 16,
        dev.frontend().name()
    );
    Ok(dev)
}

fn mode_name(m: IommuMode) -> &'static str {
    match m {
        IommuMode::SharedFd => "guest memory shared by fd",
        IommuMode::Messages => "DMA by messages only",
    }
}

/// The descriptor number a spawned device finds its connection on.
const DEVICE_SOCKET_FD: i32 = 3;

/// Runs `passthru device dma-engine --fd 3` on the child end of a socketpair. The child
/// inherits exactly standard input and output (both /dev/null), standard error and
/// that socket: every descriptor of the VMM is close-on-exec, and any the VMM itself
/// inherited is closed in the child before exec.
fn spawn_engine(theirs: UnixStream) -> Result<DeviceProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the passthru binary: {e}"))?;
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["device", "dma-engine", "--fd", &DEVICE_SOCKET_FD.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only makes the
    // system calls dup2, fcntl, close_range and close, which are async-signal-safe; it
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // The socket lands on descriptor 3 without close-on-exec; the parent's own
            // copy keeps its close-on-exec flag, so no other child inherits it.
            if fd == DEVICE_SOCKET_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, DEVICE_SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Descriptors the VMM itself inherited without close-on-exec (a test
            // harness's jobserver pipe, a shell's extra files) are not the device's
            // either: close everything above the socket.
            if libc::syscall(libc::SYS_close_range, DEVICE_SOCKET_FD + 1, libc::c_uint::MAX, 0) != 0 {
                for n in DEVICE_SOCKET_FD + 1..1024 {
                    libc::close(n);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("spawning the dma-engine process: {e}"))?;
    drop(theirs); // our copy of the child's end
    DeviceProcess::new(child).map_err(|e| format!("holding the dma-engine process (pidfd_open): {e}"))
}

/// `passthru device ...`
#[derive(Args, Debug)]
pub struct DeviceArgs {
    #[command(subcommand)]
    what: DeviceWhat,
}

#[derive(Subcommand, Debug)]
enum DeviceWhat {
    /// Serve a DMA engine over vfio-user until the VMM goes away.
    DmaEngine {
        /// Listen on this Unix socket and serve the first VMM that connects.
        #[arg(long, value_name = "PATH", required_unless_present = "fd")]
        socket: Option<PathBuf>,
        /// Serve on an already connected socket (how `passthru run` spawns devices;
        /// such a process is confined by a seccomp filter).
        #[arg(long, hide = true)]
        fd: Option<i32>,
    },
}

/// Test hook, read by spawned devices only: `forbidden-syscall` makes the device make
/// a system call its filter forbids when the guest resets it (CONTROL bit 1), so a
/// test can watch the sandbox kill it.
pub const SELFTEST_ENV: &str = "PASSTHRU_DEVICE_SELFTEST";

/// A VM without a vCPU (qtest), its console discarded, with `devices` attached and the
/// front-ends they name built: what `replay`, `acpi-dump` and the benches drive from
/// the VMM's own process. `locked` is its locked-memory account.
pub fn headless_vm(memory: u64, locked: u64, devices: &[DeviceArg]) -> Result<Vm, String> {
    let mut config = vmm::VmConfig::new(vmm::AccelKind::Qtest);
    config.memory = memory;
    config.locked_memory = Some(locked);
    config.frontends = devices.iter().map(|d| d.frontend().to_string()).collect();
    config.serial_out = Box::new(std::io::sink());
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    for d in devices {
        attach(&vm, d)?;
    }
    Ok(vm)
}

/// A listening socket at `path` that appears there only once it listens: bound and
/// listening under a temporary name in the same directory, then renamed into place,
/// so a client that sees the file can connect (no window between bind and listen).
/// An existing file at `path` is refused (address in use).
pub(crate) fn listen_at(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(std::io::ErrorKind::AddrInUse.into());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    match UnixListener::bind(&tmp) {
        Ok(l) => {
            if let Err(e) = std::fs::rename(&tmp, path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(l)
        }
        // The temporary name is too long for a socket address: bind in place.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => UnixListener::bind(path),
        Err(e) => Err(e),
    }
}

/// Runs a device server.
pub fn device(args: DeviceArgs) -> Result<ExitCode, String> {
    let DeviceWhat::DmaEngine { socket, fd } = args.what;
    let (stream, spawned) = match (socket, fd) {
        (_, Some(fd)) => {
            // SAFETY: the parent passed this descriptor, open and ours alone.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            (UnixStream::from(owned), true)
        }
        (Some(path), None) => {
            let listener = listen_at(&path).map_err(|e| {
                format!("cannot listen on {}: {e} (remove a stale socket, or pick another path)", path.display())
            })?;
            eprintln!("passthru device: dma-engine listening on {}", path.display());
            let accepted = listener.accept();
            let _ = std::fs::remove_file(&path);
            (accepted.map_err(|e| format!("accepting on {}: {e}", path.display()))?.0, false)
        }
        (None, None) => return Err("pass --socket PATH".into()),
    };
    if spawned {
        // Its VMM ends it: a terminal's Ctrl-C reaching the whole group does not.
        crate::signals::ignore_terminal_signals();
        // One malloc arena: glibc opens /proc/sys/vm/overcommit_memory when it trims a
        // thread's own arena, and the sandbox allows no open. The device's few threads
        // do not contend on the allocator.
        // SAFETY: mallopt with a plain integer option, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    let server = vfio_user::server::Server::new(vfio_user::endpoint::Endpoint::new(stream));
    let engine = devices::dma_engine::vfio::EngineServer::remote(&server).map_err(|e| e.to_string())?;
    let selftest = spawned && std::env::var(SELFTEST_ENV).is_ok_and(|v| v == "forbidden-syscall");
    if spawned {
        vfio_user::mapping::install_sigbus_guard().map_err(|e| format!("installing the SIGBUS guard: {e}"))?;
        crate::sandbox::confine_device()?;
    }
    let why = if selftest {
        server.serve(&mut SelfTest(engine))
    } else {
        let mut engine = engine;
        server.serve(&mut engine)
    };
    tracing::info!("dma-engine: connection ended: {why}");
    Ok(ExitCode::SUCCESS)
}

/// The engine, plus a forbidden system call when the guest resets it (see
/// [`SELFTEST_ENV`]).
struct SelfTest(devices::dma_engine::vfio::EngineServer);

impl vfio_user::server::Device for SelfTest {
    fn info(&self) -> vfio_user::proto::DeviceInfo {
        self.0.info()
    }
    fn region_info(&self, index: u32) -> Option<vfio_user::proto::RegionInfo> {
        self.0.region_info(index)
    }
    fn irq_info(&self, index: u32) -> Option<vfio_user::proto::IrqInfo> {
        self.0.irq_info(index)
    }
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.0.region_read(region, offset, buf)
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        if region == 0
            && offset == abi::dma_engine::regs::CONTROL
            && data.first().is_some_and(|b| u32::from(*b) & abi::dma_engine::control::RESET != 0)
        {
            // SAFETY: socket(2) with plain integer arguments; the filter kills us first.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
        self.0.region_write(region, offset, data)
    }
    fn set_irqs(&mut self, irqs: &vfio_user::proto::SetIrqs, fds: Vec<std::fs::File>) -> Result<(), i32> {
        self.0.set_irqs(irqs, fds)
    }
    fn reset(&mut self) -> Result<(), i32> {
        self.0.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_parses_back_to_the_same_device() {
        for text in [
            "dma-engine",
            "dma-engine,process=inline,dma=pvdma",
            "dma-engine,iommu-mode=messages,timeout=250ms,coherent=false,enforce-snoop=off",
            "dma-engine,dma=tce,group=3,window=512M",
            "vfio-user,socket=/tmp/x.sock,dma=pvdma,timeout=2s",
        ] {
            let a = parse_device(text).unwrap();
            assert_eq!(parse_device(&a.spec()), Ok(a.clone()), "{text} -> {}", a.spec());
        }
    }

    #[test]
    fn device_specs_parse_and_bad_ones_name_the_fix() {
        let id = "identity";
        let engine = |mode, inline, frontend| Ok(DeviceArg::engine(mode, inline, frontend));
        match parse_device("dma-engine,dma=tce,group=3").unwrap() {
            DeviceArg::DmaEngine { options, frontend, .. } => {
                assert_eq!((frontend.as_str(), options.frontend_params), ("tce", vec![("group".into(), "3".into())]))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_device("dma-engine,group=3").unwrap_err().contains("unknown --device option 'group'"));
        assert_eq!(parse_device("dma-engine"), engine(IommuMode::SharedFd, false, id));
        assert_eq!(
            parse_device("dma-engine,iommu-mode=messages,dma=pvdma"),
            engine(IommuMode::Messages, false, "pvdma")
        );
        assert_eq!(parse_device("dma-engine,process=inline"), engine(IommuMode::SharedFd, true, id));
        assert_eq!(
            parse_device("vfio-user,socket=/tmp/x.sock"),
            Ok(DeviceArg::VfioUser {
                socket: "/tmp/x.sock".into(),
                mode: IommuMode::SharedFd,
                frontend: id.to_string(),
                timeout: DEFAULT_DEVICE_TIMEOUT,
                options: AttachOptions::default()
            })
        );
        assert_eq!(
            parse_device("dma-engine,timeout=250ms"),
            Ok(DeviceArg::DmaEngine {
                mode: IommuMode::SharedFd,
                inline: false,
                frontend: id.to_string(),
                timeout: Duration::from_millis(250),
                options: AttachOptions::default()
            })
        );
        assert!(parse_device("dma-engine,timeout=0").unwrap_err().contains("timeout=500ms"));
        assert!(parse_device("dma-engine,timeout=soon").unwrap_err().contains("timeout=500ms"));
        assert!(parse_device("vfio-user").unwrap_err().contains("socket=PATH"));
        assert!(parse_device("dma-engine,process=inline,iommu-mode=messages").unwrap_err().contains("process=inline"));
        assert!(parse_device("gpu").unwrap_err().contains("unknown device"));
        assert!(parse_device("dma-engine,speed=fast").unwrap_err().contains("unknown --device option"));
        assert!(parse_device("dma-engine,iommu-mode=magic").unwrap_err().contains("shared or messages"));
        assert!(parse_device("dma-engine,dma=magic").unwrap_err().contains("identity, pvdma"));
        match parse_device("dma-engine,coherent=false,enforce-snoop=off").unwrap() {
            DeviceArg::DmaEngine { options, .. } => {
                assert_eq!(options, AttachOptions { coherent: false, enforce_snoop: false, ..AttachOptions::default() })
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_device("dma-engine,coherent=maybe").unwrap_err().contains("coherent=false"));
        assert!(parse_device("dma-engine,enforce-snoop=1").unwrap_err().contains("enforce-snoop=off"));
    }

    #[test]
    fn the_device_filter_compiles() {
        assert!(crate::sandbox::device_filters(std::process::id()).unwrap().iter().all(|p| !p.is_empty()));
    }
}
