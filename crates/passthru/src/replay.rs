//! `passthru replay virtio-iommu FILE`: a recorded request trace fed through the real
//! device's request queue as a driver would (requests built in guest memory, one
//! notification per KICK), on a VM of its own in this process (no vCPU). Prints the
//! counts by type and status, every request whose status differs from the trace's,
//! the peak of live mappings, and the VMM's time per request by type (the device's
//! own clock: taking, checking, mapping, answering; not the driver's side).

use crate::device::DeviceArg;
use iommu::viommu::client::{Client, Reply};
use iommu::viommu::trace::{self, Item};
use iommu::viommu::wire::Request;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use vmm::Vm;

/// Where the in-process driver keeps its queues and requests.
const DRIVER_AT: u64 = abi::layout::GUEST_FREE_RAM;
/// The smallest guest RAM a replay gets.
const MIN_MEMORY: u64 = 64 << 20;
/// Differences printed (all are in --json).
const SHOWN: usize = 20;
const TYPES: [&str; 5] = ["ATTACH", "DETACH", "MAP", "UNMAP", "PROBE"];

/// `passthru replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// What the trace is of.
    #[arg(value_parser = ["virtio-iommu"])]
    kind: String,
    /// The trace (`passthru run --record FILE` writes one; the format is in
    /// docs/virtio-iommu.md).
    file: PathBuf,
    /// Guest RAM. Default: enough for every guest-physical address the trace maps
    /// (at least 64M).
    #[arg(long, value_parser = crate::parse_size)]
    memory: Option<u64>,
    /// The devices the trace's endpoints become, in order of first appearance (each
    /// with dma=virtio-iommu). Default: one dma-engine in the VMM per endpoint.
    #[arg(long = "device", value_name = "SPEC", value_parser = crate::device::parse_device)]
    devices: Vec<DeviceArg>,
    /// The VM's locked-memory account (the replay pins what the trace maps). Default:
    /// twice the RAM.
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size)]
    locked_memory: Option<u64>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// A request whose status differs from the trace's.
struct Difference {
    line: usize,
    request: String,
    traced: String,
    got: String,
}

/// What a replay found.
#[derive(Default)]
struct Outcome {
    kicks: u64,
    phases: Vec<String>,
    counts: BTreeMap<(&'static str, String), u64>,
    differences: Vec<Difference>,
    peak_mappings: u64,
}

/// The guest RAM a trace needs: every mapped guest-physical byte is RAM (RAM above
/// the 32-bit MMIO hole starts at 4 GiB).
fn memory_for(entries: &[trace::Entry]) -> u64 {
    let end = entries
        .iter()
        .filter_map(|e| match e.item {
            // Only what was mapped: a MAP traced as FAULT names memory that was not RAM.
            Item::Request { request: Request::Map { virt_start, virt_end, phys_start, .. }, status, .. }
                if status.is_none_or(|s| s == abi::viommu::status::OK) =>
            {
                virt_end.checked_sub(virt_start).and_then(|l| phys_start.checked_add(l)).and_then(|x| x.checked_add(1))
            }
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let hole = abi::layout::MMIO_HOLE_END - abi::layout::MMIO_HOLE_START;
    let need = if end > abi::layout::MMIO_HOLE_START { end.saturating_sub(hole) } else { end };
    need.next_multiple_of(2 << 20).clamp(MIN_MEMORY, vmm::memory::MAX_RAM)
}

/// The trace's endpoints, in order of first appearance.
fn endpoints(entries: &[trace::Entry]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in entries {
        if let Item::Request { request, .. } = &e.item {
            let ep = match *request {
                Request::Attach { endpoint, .. } | Request::Detach { endpoint, .. } | Request::Probe { endpoint } => {
                    endpoint
                }
                _ => continue,
            };
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
    }
    out
}

/// `r` with its endpoint replaced through `map`.
fn remap(r: Request, map: &BTreeMap<u32, u32>) -> Request {
    let m = |e: u32| map.get(&e).copied().unwrap_or(e);
    match r {
        Request::Attach { domain, endpoint, flags, reserved } => {
            Request::Attach { domain, endpoint: m(endpoint), flags, reserved }
        }
        Request::Detach { domain, endpoint } => Request::Detach { domain, endpoint: m(endpoint) },
        Request::Probe { endpoint } => Request::Probe { endpoint: m(endpoint) },
        other => other,
    }
}

fn type_name(r: &Request) -> &'static str {
    match r {
        Request::Attach { .. } => TYPES[0],
        Request::Detach { .. } => TYPES[1],
        Request::Map { .. } => TYPES[2],
        Request::Unmap { .. } => TYPES[3],
        Request::Probe { .. } => TYPES[4],
    }
}

/// The first RESV_MEM MSI region of a PROBE's properties.
fn msi_region(props: &[u8]) -> Option<(u64, u64)> {
    let mut o = 0usize;
    while o + 24 <= props.len() {
        let kind = u16::from_le_bytes([props[o], props[o + 1]]) & 0xfff;
        let len = usize::from(u16::from_le_bytes([props[o + 2], props[o + 3]]));
        if kind == 0 {
            return None;
        }
        if kind == abi::viommu::probe::T_RESV_MEM && props[o + 4] == abi::viommu::probe::RESV_MEM_T_MSI {
            let start = u64::from_le_bytes(props[o + 8..o + 16].try_into().ok()?);
            let end = u64::from_le_bytes(props[o + 16..o + 24].try_into().ok()?);
            return Some((start, end));
        }
        o = o.checked_add(4 + len)?;
    }
    None
}

/// The pending requests of one kick: (line, request as traced, as sent, expected
/// status, expected MSI region).
type Pending = Vec<(usize, Request, Request, u8, Option<(u64, u64)>)>;

fn settle(out: &mut Outcome, pending: &Pending, replies: &[Reply]) {
    for ((line, traced, _, want, resv), reply) in pending.iter().zip(replies) {
        let got = reply.status.map_or_else(|| format!("no status (used length {})", reply.used), trace::status_name);
        *out.counts.entry((type_name(traced), got.clone())).or_default() += 1;
        let mut differs = reply.status != Some(*want);
        let mut traced_s = trace::status_name(*want);
        let mut got_s = got;
        if let (Some(r), Some(st)) = (resv, reply.status) {
            let ours = msi_region(reply.properties());
            if st == abi::viommu::status::OK && ours != Some(*r) {
                differs = true;
                traced_s += &format!(" resv=msi:{:#x}-{:#x}", r.0, r.1);
                got_s += &ours.map_or(" no MSI region".into(), |(a, b)| format!(" resv=msi:{a:#x}-{b:#x}"));
            }
        }
        if differs {
            out.differences.push(Difference {
                line: *line,
                request: trace::format(traced, None, None),
                traced: traced_s,
                got: got_s,
            });
        }
    }
}

/// Runs the replay; the outcome and the VM it ran on.
fn replay(args: &ReplayArgs, entries: &[trace::Entry]) -> Result<(Outcome, Vm), String> {
    let eps = endpoints(entries);
    let devices: Vec<DeviceArg> = if args.devices.is_empty() {
        let spec = "dma-engine,dma=virtio-iommu,process=inline";
        (0..eps.len().max(1)).map(|_| crate::device::parse_device(spec)).collect::<Result<_, _>>()?
    } else {
        args.devices.clone()
    };
    if let Some(d) = devices.iter().find(|d| d.frontend() != iommu::viommu::REGISTRATION.name) {
        return Err(format!(
            "--device {}: a replayed device is behind the virtio-iommu: add dma=virtio-iommu",
            d.spec()
        ));
    }
    if devices.len() < eps.len() {
        return Err(format!(
            "the trace names {} endpoints and {} devices were given: give one --device per endpoint, or none",
            eps.len(),
            devices.len()
        ));
    }
    let memory = args.memory.unwrap_or_else(|| memory_for(entries));
    let locked = args.locked_memory.unwrap_or(memory.saturating_mul(2));
    let vm = crate::device::headless_vm(memory, locked, &devices)?;
    let ids: Vec<u32> = vm.devices().iter().map(|d| u32::from(d.bdf())).collect();
    let map: BTreeMap<u32, u32> = eps.iter().copied().zip(ids).collect();
    let mem = Arc::clone(vm.ram().memory_arc());
    let mut client = Client::start(&vm, mem, DRIVER_AT, Client::<&Vm>::linux_features())?;
    let fe = vm.frontends().get(iommu::viommu::REGISTRATION.name).ok_or("no virtio-iommu")?;
    let mappings = || match fe.stats().get("mappings") {
        Some(iommu::StatValue::Gauge(n)) => *n,
        _ => 0,
    };
    let mut out = Outcome::default();
    let mut pending: Pending = Vec::new();
    let kick = |pending: &mut Pending, out: &mut Outcome, client: &mut Client<&Vm>| -> Result<(), String> {
        if pending.is_empty() {
            return Ok(());
        }
        let sent: Vec<Request> = pending.iter().map(|p| p.2).collect();
        let replies = client.send(&sent)?;
        settle(out, pending, &replies);
        out.kicks += 1;
        out.peak_mappings = out.peak_mappings.max(mappings());
        pending.clear();
        Ok(())
    };
    for e in entries {
        match &e.item {
            Item::Phase(name) => out.phases.push(name.clone()),
            Item::Kick => kick(&mut pending, &mut out, &mut client)?,
            Item::Request { request, status, resv } => {
                let want = status.unwrap_or(trace::EXPECTED_DEFAULT);
                pending.push((e.line, *request, remap(*request, &map), want, *resv));
            }
        }
    }
    kick(&mut pending, &mut out, &mut client)?;
    drop(client);
    Ok((out, vm))
}

/// The VMM's time per request, by type: (count, nanoseconds per request).
fn costs(vm: &Vm) -> Vec<(&'static str, u64, u64)> {
    let Some(fe) = vm.frontends().get(iommu::viommu::REGISTRATION.name) else { return Vec::new() };
    let s = fe.stats();
    let get = |k: &str| match s.get(k) {
        Some(iommu::StatValue::Total(n)) => *n,
        _ => 0,
    };
    ["attach", "detach", "map", "unmap", "probe"]
        .iter()
        .zip(TYPES)
        .map(|(k, t)| {
            let n = get(k);
            (t, n, get(&format!("{k}_ns")).checked_div(n).unwrap_or(0))
        })
        .collect()
}

fn report(args: &ReplayArgs, entries: usize, out: &Outcome, costs: &[(&'static str, u64, u64)]) -> String {
    let requests: u64 = out.counts.values().sum();
    let mut s = format!(
        "replay: {}: {requests} requests in {} kicks ({} lines{})\n",
        args.file.display(),
        out.kicks,
        entries,
        if out.phases.is_empty() { String::new() } else { format!("; phases: {}", out.phases.join(", ")) }
    );
    s += "  type     count  statuses                      VMM ns/request\n";
    for (t, n, ns) in costs {
        if *n == 0 {
            continue;
        }
        let st: Vec<String> =
            out.counts.iter().filter(|((k, _), _)| k == t).map(|((_, st), c)| format!("{st}={c}")).collect();
        s += &format!("  {t:<7} {n:>6}  {:<29} {ns:>8}\n", st.join(" "));
    }
    s += &format!("peak live mappings: {}\n", out.peak_mappings);
    s += &format!("statuses that differ from the trace: {}\n", out.differences.len());
    for d in out.differences.iter().take(SHOWN) {
        s += &format!("  line {}: {}: traced {}, got {}\n", d.line, d.request, d.traced, d.got);
    }
    if out.differences.len() > SHOWN {
        s += &format!("  ... and {} more (all in --json)\n", out.differences.len() - SHOWN);
    }
    s
}

fn to_json(out: &Outcome, costs: &[(&'static str, u64, u64)]) -> serde_json::Value {
    json!({
        "kicks": out.kicks,
        "phases": out.phases,
        "requests": costs.iter().map(|(t, n, ns)| {
            let statuses: serde_json::Map<String, serde_json::Value> = out.counts.iter()
                .filter(|((k, _), _)| k == t)
                .map(|((_, st), c)| (st.clone(), json!(c)))
                .collect();
            (t.to_string(), json!({ "count": n, "statuses": statuses, "vmm_ns_per_request": ns }))
        }).collect::<serde_json::Map<_, _>>(),
        "peak_mappings": out.peak_mappings,
        "differences": out.differences.iter().map(|d| json!({
            "line": d.line, "request": d.request, "traced": d.traced, "got": d.got,
        })).collect::<Vec<_>>(),
    })
}

/// `passthru replay`: exit status 0 when every status is the trace's, 1 otherwise.
pub fn run(args: ReplayArgs) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let entries = trace::parse(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let (out, vm) = replay(&args, &entries)?;
    let costs = costs(&vm);
    drop(vm);
    let text = report(&args, entries.len(), &out, &costs);
    let _ = std::io::stdout().write_all(text.as_bytes());
    if let Some(path) = &args.json {
        let j = serde_json::to_string_pretty(&to_json(&out, &costs)).map_err(|e| e.to_string())?;
        std::fs::write(path, j + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(if out.differences.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
