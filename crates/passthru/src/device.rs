//! Assigned devices on the command line: `--device` specs, spawning device processes,
//! and `passthru device dma-engine` (the device side).

use clap::{Args, Subcommand};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use vmm::assigned::IommuMode;
use vmm::{DeviceSpec, DmaFrontend, Vm};

/// A parsed `--device` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// `dma-engine[,dma=identity|pvdma][,iommu-mode=shared|messages][,process=child|inline]`
    DmaEngine {
        /// How a device process reaches guest memory.
        mode: IommuMode,
        /// In the VMM rather than in a child process.
        inline: bool,
        /// Who programs its DMA domain.
        frontend: DmaFrontend,
    },
    /// `vfio-user,socket=PATH[,dma=...][,iommu-mode=shared|messages]`: a running server.
    VfioUser {
        /// The server's socket.
        socket: PathBuf,
        /// How it reaches guest memory.
        mode: IommuMode,
        /// Who programs its DMA domain.
        frontend: DmaFrontend,
    },
}

/// Parses a `--device` value.
pub fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let (mut mode, mut inline, mut socket, mut frontend) = (IommuMode::SharedFd, false, None, DmaFrontend::Identity);
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
            "dma" => {
                frontend = match v {
                    "identity" => DmaFrontend::Identity,
                    "pvdma" => DmaFrontend::Paravirtual,
                    _ => return Err(format!("dma={v}: use dma=identity or dma=pvdma")),
                }
            }
            _ => return Err(format!("unknown --device option '{k}' (dma, iommu-mode, process, socket)")),
        }
    }
    match kind {
        "dma-engine" if socket.is_none() => {
            if inline && mode == IommuMode::Messages {
                return Err("iommu-mode=messages needs a device process; drop process=inline".into());
            }
            Ok(DeviceArg::DmaEngine { mode, inline, frontend })
        }
        "vfio-user" => match socket {
            Some(socket) if !inline => Ok(DeviceArg::VfioUser { socket, mode, frontend }),
            Some(_) => Err("a vfio-user device runs in its own process: drop process=inline".into()),
            None => Err("--device vfio-user needs socket=PATH of a running server".into()),
        },
        "dma-engine" => {
            Err("dma-engine takes no socket; for a running server use --device vfio-user,socket=PATH".into())
        }
        other => Err(format!("unknown device '{other}': use dma-engine or vfio-user,socket=PATH")),
    }
}

/// Attaches one device to `vm`, spawning its process if needed. Returns the child.
pub fn attach(vm: &Vm, arg: &DeviceArg) -> Result<Option<std::process::Child>, String> {
    let (spec, child, what, frontend) = match arg {
        DeviceArg::DmaEngine { inline: true, frontend, .. } => {
            (DeviceSpec::Inline, None, "in the VMM process".to_string(), *frontend)
        }
        DeviceArg::DmaEngine { mode, frontend, .. } => {
            let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let child = spawn_engine(theirs)?;
            let what = format!("in process {} over vfio-user, {}", child.id(), mode_name(*mode));
            (DeviceSpec::Remote { stream: ours, mode: *mode }, Some(child), what, *frontend)
        }
        DeviceArg::VfioUser { socket, mode, frontend } => {
            let stream = UnixStream::connect(socket)
                .map_err(|e| format!("connecting to the vfio-user server at {}: {e}", socket.display()))?;
            let what = format!("at {} over vfio-user, {}", socket.display(), mode_name(*mode));
            (DeviceSpec::Remote { stream, mode: *mode }, None, what, *frontend)
        }
    };
    let dev = vm.attach_device(spec, frontend).map_err(|e| e.to_string())?;
    let dma = match frontend {
        DmaFrontend::Identity => "identity DMA domain",
        DmaFrontend::Paravirtual => "paravirtual DMA",
    };
    eprintln!("passthru: device {}: dma-engine {what}, {dma}, BAR0 {:#x}", dev.name(), dev.bar0());
    Ok(child)
}

fn mode_name(m: IommuMode) -> &'static str {
    match m {
        IommuMode::SharedFd => "guest memory shared by fd",
        IommuMode::Messages => "DMA by messages only",
    }
}

/// Runs `passthru device dma-engine --fd N` on the child end of a socketpair.
fn spawn_engine(theirs: UnixStream) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the passthru binary: {e}"))?;
    let fd = theirs.as_raw_fd();
    // The child inherits this one descriptor: clear close-on-exec on it only.
    // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    let child = std::process::Command::new(exe)
        .args(["device", "dma-engine", "--fd", &fd.to_string()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning the dma-engine process: {e}"));
    drop(theirs); // our copy of the child's end
    child
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
        /// Serve on an already connected socket (how `passthru run` spawns devices).
        #[arg(long, hide = true)]
        fd: Option<i32>,
    },
}

/// Runs a device server.
pub fn device(args: DeviceArgs) -> Result<ExitCode, String> {
    let DeviceWhat::DmaEngine { socket, fd } = args.what;
    let stream = match (socket, fd) {
        (_, Some(fd)) => {
            // SAFETY: the parent passed this descriptor, open and ours alone.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            UnixStream::from(owned)
        }
        (Some(path), None) => {
            let listener = UnixListener::bind(&path).map_err(|e| {
                format!("cannot listen on {}: {e} (remove a stale socket, or pick another path)", path.display())
            })?;
            eprintln!("passthru device: dma-engine listening on {}", path.display());
            let accepted = listener.accept();
            let _ = std::fs::remove_file(&path);
            accepted.map_err(|e| format!("accepting on {}: {e}", path.display()))?.0
        }
        (None, None) => return Err("pass --socket PATH".into()),
    };
    devices::dma_engine::vfio::serve(stream).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_bad_ones_name_the_fix() {
        let id = DmaFrontend::Identity;
        let engine = |mode, inline, frontend| Ok(DeviceArg::DmaEngine { mode, inline, frontend });
        assert_eq!(parse_device("dma-engine"), engine(IommuMode::SharedFd, false, id));
        assert_eq!(
            parse_device("dma-engine,iommu-mode=messages,dma=pvdma"),
            engine(IommuMode::Messages, false, DmaFrontend::Paravirtual)
        );
        assert_eq!(parse_device("dma-engine,process=inline"), engine(IommuMode::SharedFd, true, id));
        assert_eq!(
            parse_device("vfio-user,socket=/tmp/x.sock"),
            Ok(DeviceArg::VfioUser { socket: "/tmp/x.sock".into(), mode: IommuMode::SharedFd, frontend: id })
        );
        assert!(parse_device("vfio-user").unwrap_err().contains("socket=PATH"));
        assert!(parse_device("dma-engine,process=inline,iommu-mode=messages").unwrap_err().contains("process=inline"));
        assert!(parse_device("gpu").unwrap_err().contains("unknown device"));
        assert!(parse_device("dma-engine,speed=fast").unwrap_err().contains("unknown --device option"));
        assert!(parse_device("dma-engine,iommu-mode=magic").unwrap_err().contains("shared or messages"));
        assert!(parse_device("dma-engine,dma=magic").unwrap_err().contains("dma=pvdma"));
    }
}
