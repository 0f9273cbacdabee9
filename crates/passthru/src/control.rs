//! The control API's VMM side: carries out [`api::Command`]s on a running [`Vm`] and
//! describes it (`vm.info`, `vm.counters`) as JSON. Requests run on the API server's
//! client threads, concurrently with the vCPU and with each other; every operation
//! used here is safe to race (device attach and detach serialize in the device
//! manager, interrupt modes in the registry, memory changes in the memory map).

use api::{ApiError, Command, Handler};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use vmm::Vm;

/// Most domain mappings listed per device in `vm.info` (the count is always given).
pub const MAX_LISTED_MAPPINGS: usize = 256;

/// Each attached device's `--device` text, by name (a snapshot records them).
pub type Specs = Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>;

/// The VMM as the API server's handler.
pub struct Control {
    vm: Arc<Vm>,
    specs: Specs,
}

impl Control {
    /// Serves `vm`, whose devices were given as `specs` say.
    pub fn new(vm: Arc<Vm>, specs: Specs) -> Control {
        Control { vm, specs }
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, String>> {
        self.specs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Handler for Control {
    fn events(&self) -> Result<std::sync::mpsc::Receiver<String>, ApiError> {
        Ok(self.vm.subscribe_events())
    }

    fn handle(&self, command: Command) -> Result<Value, ApiError> {
        let vm = &self.vm;
        match command {
            Command::Info => Ok(info(vm)),
            Command::Counters => Ok(counters(vm)),
            Command::AddDevice { device } => {
                let arg = crate::device::parse_device(&device)
                    .map_err(|e| ApiError::bad_request(format!("\"device\": {e}")))?;
                let dev = crate::device::attach(vm, &arg).map_err(ApiError::conflict)?;
                self.specs().insert(dev.name().to_string(), arg.spec());
                Ok(json!({ "name": dev.name(), "bdf": dev.bdf_string(), "frontend": dev.frontend().name() }))
            }
            Command::RemoveDevice { name } => {
                if vm.device(&name).is_none() {
                    return Err(ApiError::not_found(format!("no device '{name}' (see vm.info)")));
                }
                vm.detach_device(&name).map_err(|e| ApiError::conflict(e.to_string()))?;
                self.specs().remove(&name);
                Ok(json!({ "removed": name }))
            }
            Command::Pause => {
                let t = std::time::Instant::now();
                let unquiesced = vm.pause().map_err(run_error)?;
                Ok(json!({ "state": "paused", "took_us": t.elapsed().as_micros() as u64, "unquiesced": unquiesced }))
            }
            Command::Resume => {
                let failed = vm.resume().map_err(run_error)?;
                // A device that did not run again is gone (surprise removal): say so.
                Ok(json!({ "state": "running", "failed": failed }))
            }
            Command::Shutdown { status } => {
                vm.request_exit(status);
                Ok(json!({ "status": vm.exit_status().unwrap_or(status) }))
            }
            Command::IrqSetMode { device, index, sub, mode } => {
                let mode: irq::Mode = mode.parse().map_err(ApiError::bad_request)?;
                let id = irq::SourceId::new(&device, index, sub);
                vm.irqs().set_mode(&id, mode).map_err(|e| match e {
                    irq::IrqError::Unknown(_) => ApiError::not_found(format!("{e} (see vm.info's interrupt sources)")),
                    other => ApiError::conflict(other.to_string()),
                })?;
                Ok(json!({ "source": id.to_string(), "mode": mode.to_string() }))
            }
            Command::MemoryAdd { gpa, size } => {
                vm.add_ram(gpa, size).map_err(|e| ApiError::conflict(e.to_string()))?;
                Ok(json!({ "gpa": gpa, "size": size }))
            }
            Command::Snapshot { dir } => {
                let specs = self.specs().clone();
                let r = vmm::snapshot::save(vm, std::path::Path::new(&dir), &|name| specs.get(name).cloned())
                    .map_err(|e| ApiError::conflict(e.to_string()))?;
                Ok(json!({
                    "dir": dir, "bytes": r.bytes, "ram_bytes": r.ram_bytes, "device_memory_bytes": r.device_memory_bytes,
                    "paused_us": r.paused.as_micros() as u64, "took_us": r.took.as_micros() as u64,
                }))
            }
            Command::MemoryRemove { gpa } => {
                vm.remove_ram(gpa).map_err(|e| ApiError::conflict(e.to_string()))?;
                Ok(json!({ "removed": gpa }))
            }
            Command::FrontendQuery { frontend, query, arg } => {
                self.frontend_query(&frontend, &query, &arg, false).map(|(v, _)| v)
            }
            // Served as a stream by the server (see `events`), never as one answer.
            Command::Events => Err(ApiError::bad_request("events is a stream: GET it on a connection of its own")),
        }
    }

    fn handle_with_files(&self, command: Command) -> Result<(Value, Vec<std::fs::File>), ApiError> {
        match command {
            Command::FrontendQuery { frontend, query, arg } => self.frontend_query(&frontend, &query, &arg, true),
            other => self.handle(other).map(|v| (v, Vec::new())),
        }
    }
}

impl Control {
    /// `frontend.query`: a front-end's own query, its fields as JSON and (`with_files`)
    /// read-only descriptors of the files it hands out.
    fn frontend_query(
        &self,
        frontend: &str,
        query: &str,
        arg: &str,
        with_files: bool,
    ) -> Result<(Value, Vec<std::fs::File>), ApiError> {
        use iommu::FrontendError;
        let fe = self.vm.frontends().get(frontend).ok_or_else(|| {
            ApiError::not_found(format!("no DMA front-end '{frontend}' in this VM (vm.info lists those it has)"))
        })?;
        let q =
            fe.queries().ok_or_else(|| ApiError::not_found(format!("DMA front-end {frontend} answers no queries")))?;
        let answer = q.query(query, arg).map_err(|e| match e {
            FrontendError::Invalid(_) => ApiError::bad_request(e.to_string()),
            _ => ApiError::not_found(e.to_string()),
        })?;
        let mut v = answer.fields.to_json();
        if !with_files || answer.files.is_empty() {
            return Ok((v, Vec::new()));
        }
        // A new open file description each, read-only: the reader can map and read,
        // never write (a dup would share the VMM's read-write one).
        use std::os::fd::AsRawFd;
        let files = answer
            .files
            .iter()
            .map(|f| std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError::conflict(format!("opening a file read-only: {e}")))?;
        v["files"] = json!(files.len());
        Ok((v, files))
    }
}

fn run_error(e: vmm::run_control::RunError) -> ApiError {
    match e {
        vmm::run_control::RunError::Timeout(_) => ApiError::internal(e.to_string()),
        _ => ApiError::conflict(e.to_string()),
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// One device in `vm.info`: its address, process, front-end, BARs, domain (the first
/// mappings), interrupt sources.
fn device_info(vm: &Vm, d: &vmm::AssignedDevice, sources: &[irq::SourceId]) -> Value {
    let f = d.function();
    let domain = d.function().domain();
    let mappings: Vec<Value> = domain
        .as_ref()
        .map(|dom| {
            dom.mappings_upto(MAX_LISTED_MAPPINGS)
                .iter()
                .map(|m| {
                    let perm = match (m.perm.bits() & 1 != 0, m.perm.bits() & 2 != 0) {
                        (true, true) => "rw",
                        (true, false) => "r",
                        (false, true) => "w",
                        _ => "-",
                    };
                    json!({ "iova": hex(m.iova.0), "gpa": hex(m.gpa.0), "size": m.size, "perm": perm })
                })
                .collect()
        })
        .unwrap_or_default();
    let irqs: Vec<Value> = sources
        .iter()
        .filter(|id| id.device == d.name())
        .filter_map(|id| vm.irqs().stats(id).map(|s| json!({ "source": id.to_string(), "mode": s.mode.to_string() })))
        .collect();
    let bars: Vec<Value> = d
        .bars()
        .iter()
        .map(|b| json!({ "bar": b.bar, "io": b.io, "addr": hex(b.addr), "size": b.size, "mmapped": !b.mapped.is_empty() }))
        .collect();
    json!({
        "name": d.name(),
        "bdf": d.bdf_string(),
        "gone": d.is_torn_down(),
        "process": d.process().map(|p| p.pid()),
        "frontend": d.frontend().name(),
        "bus_master": f.bus_master(),
        "irq_mode": f.irq_mode().to_string(),
        "bars": bars,
        "domain": domain.as_ref().map(|dom| json!({
            "name": dom.name(),
            "mapping_count": dom.mapping_count(),
            "mappings": mappings,
            "listed": mappings.len(),
        })),
        "interrupt_sources": irqs,
    })
}

/// `vm.info`: the memory map, the devices and the run state.
pub fn info(vm: &Vm) -> Value {
    let memory: Vec<Value> = vm
        .memory_types()
        .into_iter()
        .map(|(r, flagged, t)| {
            let owner = match &r.kind {
                vm_api::RegionKind::Ram => "ram".to_string(),
                vm_api::RegionKind::RamDevice { device } => device.clone(),
            };
            json!({
                "gpa": hex(r.gpa), "size": r.size, "owner": owner,
                "noncoherent": flagged, "log_dirty": r.flags.log_dirty,
                "memory_type": { "pat_wb": t[0].to_string(), "pat_wc": t[1].to_string(),
                                 "vm_wide_kernel_pat_wb": t[2].to_string(), "vm_wide_kernel_pat_wc": t[3].to_string() },
            })
        })
        .collect();
    let sources = vm.irqs().sources();
    let devices: Vec<Value> = vm.devices().iter().map(|d| device_info(vm, d, &sources)).collect();
    // The guest's own PAT and CR0.CD (read from the vCPU) give each slot's effective
    // type per PAT entry; without a vCPU the reset PAT stands in.
    let (pat, cd, source) = match vm.guest_cache_control() {
        Some((pat, cd)) => (pat, cd, "guest"),
        None => (vmm::memtype::PAT_RESET, false, "reset value (no vCPU running)"),
    };
    let by_entry: Vec<Value> = vm
        .memory_types_for(pat, cd)
        .iter()
        .map(|(r, [slot, wide])| {
            json!({
                "gpa": hex(r.gpa),
                "per_slot": slot.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "vm_wide_kernel": wide.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let (pauses, paused) = vm.run_control().pauses();
    json!({
        "run": { "state": vm.run_control().state().to_string(), "pauses": pauses, "paused_us": paused.as_micros() as u64,
                 "accel": if vm.kvm().is_some() { "kvm" } else { "qtest" } },
        "memory": memory,
        "cache_control": { "pat": hex(pat), "cr0_cd": cd, "from": source, "memory_type_by_pat_entry": by_entry },
        "devices": devices,
        "frontends": vm.frontends().all().iter().map(|fe| {
            let queries: Vec<Value> = fe.queries().map_or_else(Vec::new, |q| {
                q.list().iter().map(|x| json!({ "query": x.name, "help": x.help })).collect()
            });
            json!({ "name": fe.name(), "queries": queries })
        }).collect::<Vec<_>>(),
        "hotplug": "the guest learns of added and removed devices by polling the PCI bus (no hot-plug controller)",
    })
}

/// `vm.counters`: every counter the VMM keeps.
pub fn counters(vm: &Vm) -> Value {
    let exits: Map<String, Value> =
        vm.exit_counters().snapshot().iter().map(|(k, v)| ((*k).to_string(), Value::from(*v))).collect();
    let hypercalls: Vec<Value> = vm
        .hypercalls()
        .counts()
        .iter()
        .map(|c| {
            let status =
                abi::hcall::Status::from_raw(c.status).map_or_else(|| c.status.to_string(), |s| format!("{s:?}"));
            json!({ "nr": hex(c.nr), "frontend": c.owner, "status": status, "count": c.count })
        })
        .collect();
    let frontends: Map<String, Value> =
        vm.frontends().all().iter().map(|fe| (fe.name().to_string(), fe.stats().to_json())).collect();
    let kinds: Map<String, Value> =
        vm.frontends().all().iter().map(|fe| (fe.name().to_string(), fe.stats().kinds_json())).collect();
    let devices: Map<String, Value> = vm
        .devices()
        .iter()
        .map(|d| {
            let f = d.function();
            let ep = d.endpoint();
            // The device's domain, whether or not bus mastering lets it through now.
            let domain = f.domain();
            let (maps, unmaps) = domain.as_ref().map_or((0, 0), |dom| dom.counters());
            let (err, req) = f.notifications();
            let v = json!({
                "dma_maps": maps, "dma_unmaps": unmaps,
                "mappings": domain.as_ref().map_or(0, |dom| dom.mapping_count()),
                "dma_enabled": ep.domain().is_some(),
                "dma_faults": ep.faults().total(),
                "bar_accesses": f.bar_accesses(),
                "protocol_violations": f.violations(),
                "err_irqs": err, "req_irqs": req,
                "gone": d.is_torn_down(),
                "frontend": d.frontend().device_stats(d.bdf()).map_or(Value::Null, |s| s.to_json()),
            });
            (d.name().to_string(), v)
        })
        .collect();
    let interrupts: Map<String, Value> = vm
        .irqs()
        .sources()
        .iter()
        .filter_map(|id| {
            vm.irqs().stats(id).map(|s| {
                (
                    id.to_string(),
                    json!({ "mode": s.mode.to_string(), "vmm_delivered": s.vmm_delivered, "switches": s.switches }),
                )
            })
        })
        .collect();
    let c = vm.irqs().counts();
    let account = vm.dma().account();
    let nc = vm.device_manager().noncoherent();
    let (pauses, paused) = vm.run_control().pauses();
    json!({
        "exits": exits,
        "hypercalls": hypercalls,
        "hypercalls_unknown": vm.hypercalls().unknown_calls(),
        "frontends": frontends,
        "frontend_kinds": kinds,
        "devices": devices,
        "interrupts": interrupts,
        "irq_resources": { "sources": c.sources, "forwarded": c.forwarded, "irqfds": c.irqfds, "watched": c.watched, "msi_routes": c.msi_routes },
        "locked_memory": { "limit": account.limit(), "locked": account.locked(), "pinned": account.pinned(), "charged": account.charged() },
        "noncoherent": { "devices": nc.count(), "transitions": nc.transitions(), "flushed_bytes": vmm::flush::flushed_bytes() },
        "run": { "state": vm.run_control().state().to_string(), "pauses": pauses, "paused_us": paused.as_micros() as u64,
                 "resume_failures": vm.resume_failures(), "pid": std::process::id(),
                 "uptime_us": vm.events().uptime().as_micros() as u64 },
        "resources": resources(),
    })
}

/// The process's descriptors and threads (leak checks): `{fds, eventfds, threads: {name: n}}`.
pub fn resources() -> Value {
    let r = vmm::Resources::now();
    json!({ "fds": r.fds, "eventfds": r.eventfds, "threads": r.threads })
}
