//! `passthru ctl SOCKET COMMAND` (one request to the control API, readable output or
//! `--json`) and `passthru stat SOCKET` (live counters, as `kvm_stat`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long `ctl` and `stat` wait for each read and write of an answer (a hot-plug
/// that spawns a device process takes well under this).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
/// `passthru ctl` arguments.
pub struct CtlArgs {
    /// The API socket (`passthru run --api-socket PATH`).
    socket: PathBuf,
    /// Print the answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Memory map, devices (BDF, BARs, DMA front-end, mappings, interrupt sources), run state.
    Info,
    /// Every counter the VMM keeps.
    Counters,
    /// Hot-plug a device: the --device syntax, e.g. dma-engine,dma=pvdma.
    AddDevice {
        /// The device specification.
        spec: String,
    },
    /// Hot-unplug a device by name.
    RemoveDevice {
        /// Its name (see info).
        name: String,
    },
    /// Stop the vCPU at an instruction boundary.
    Pause,
    /// Let a paused vCPU run again.
    Resume,
    /// Stop the VM; passthru exits with STATUS.
    Shutdown {
        /// Exit status.
        #[arg(default_value_t = 0)]
        status: u8,
    },
    /// Set who delivers one interrupt source: forwarded (KVM) or vmm.
    IrqSetMode {
        /// DEVICE/INDEX/SUB, e.g. dma0/2/0 (see info).
        source: String,
        /// forwarded or vmm.
        mode: String,
    },
    /// Hot-add RAM at GPA (0x hexadecimal, or a size like 4G).
    MemoryAdd {
        /// Guest-physical start.
        gpa: String,
        /// Bytes (e.g. 256M).
        size: String,
    },
    /// Hot-remove RAM added with memory-add.
    MemoryRemove {
        /// Guest-physical start.
        gpa: String,
    },
    /// Save the VM to DIR (restore with passthru run --restore DIR).
    Snapshot {
        /// The snapshot's directory (replaced atomically if it exists).
        dir: String,
    },
    /// Follow the VM's events (run state, devices added, removed and gone, interrupt
    /// forwarding switched, snapshots, DMA faults per second) until it ends or Ctrl-C.
    Events,
    /// A DMA front-end's own query (info lists each front-end's), e.g.
    /// `frontend tce table 0x1000`: the TCE table behind a liobn, its file (passed by
    /// the VMM) mapped and its valid entries listed, as a tool would.
    Frontend {
        /// The front-end's name.
        frontend: String,
        /// The query.
        query: String,
        /// Its argument.
        #[arg(default_value = "")]
        arg: String,
        /// Most entries a listing shows.
        #[arg(long, default_value_t = 4096)]
        max: usize,
    },
}

fn request(c: &CtlCommand) -> (&'static str, &'static str, Option<Value>) {
    match c {
        CtlCommand::Info => ("GET", "vm.info", None),
        CtlCommand::Events => ("GET", "events", None),
        CtlCommand::Counters => ("GET", "vm.counters", None),
        CtlCommand::AddDevice { spec } => ("PUT", "vm.add-device", Some(json!({ "device": spec }))),
        CtlCommand::RemoveDevice { name } => ("PUT", "vm.remove-device", Some(json!({ "name": name }))),
        CtlCommand::Pause => ("PUT", "vm.pause", None),
        CtlCommand::Resume => ("PUT", "vm.resume", None),
        CtlCommand::Shutdown { status } => ("PUT", "vm.shutdown", Some(json!({ "status": status }))),
        CtlCommand::IrqSetMode { source, mode } => {
            ("PUT", "irq.set-mode", Some(json!({ "source": source, "mode": mode })))
        }
        CtlCommand::MemoryAdd { gpa, size } => ("PUT", "memory.add", Some(json!({ "gpa": gpa, "size": size }))),
        CtlCommand::MemoryRemove { gpa } => ("PUT", "memory.remove", Some(json!({ "gpa": gpa }))),
        CtlCommand::Frontend { frontend, query, arg, .. } => {
            ("PUT", "frontend.query", Some(json!({ "frontend": frontend, "query": query, "arg": arg })))
        }
        CtlCommand::Snapshot { dir } => {
            // The server resolves relative paths against its own directory: send ours.
            let abs = std::path::absolute(dir).map_or_else(|_| dir.clone(), |p| p.display().to_string());
            ("PUT", "vm.snapshot", Some(json!({ "dir": abs })))
        }
    }
}

/// Runs `passthru ctl`: exit 0 on a 2xx answer, 1 with the server's message otherwise.
/// Ctrl-C (or SIGTERM, SIGHUP) ends it with 128 + N, saying what the VMM goes on doing:
/// no request of the API can be cancelled once sent (a snapshot finishes, or fails
/// leaving the previous one whole).
pub fn ctl(args: CtlArgs) -> Result<ExitCode, String> {
    crate::signals::block();
    let what = match &args.command {
        CtlCommand::Snapshot { dir } => {
            format!("the VMM goes on writing the snapshot to {dir} (a snapshot cannot be cancelled)")
        }
        CtlCommand::Events => "no longer following the events; the VM goes on".to_string(),
        _ => "the request was sent; the VMM carries it out".to_string(),
    };
    crate::signals::watch("", Vec::new(), move |status| {
        eprintln!("passthru ctl: interrupted: {what}");
        std::process::exit(i32::from(status));
    })?;
    if let CtlCommand::Events = args.command {
        let json = args.json;
        api::client::follow_events(&args.socket, |line| {
            let text = if json { line.to_string() } else { human_event(line) };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let (method, endpoint, body) = request(&args.command);
    let body = body.map(|b| b.to_string());
    // A snapshot takes a while: a spinner on a terminal (nothing otherwise).
    let spinner = matches!(args.command, CtlCommand::Snapshot { .. }).then(|| {
        use std::io::IsTerminal;
        let s = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new_spinner()
        } else {
            indicatif::ProgressBar::hidden()
        };
        s.set_message("saving the VM");
        s.enable_steady_tick(Duration::from_millis(100));
        s
    });
    let answer = api::client::call_with_files(&args.socket, method, endpoint, body.as_deref(), CLIENT_TIMEOUT);
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let (mut answer, files) = answer?;
    if !(200..300).contains(&answer.status) {
        return Err(format!("{endpoint}: {} ({})", answer.message(), answer.status));
    }
    // A front-end's query with a tool of its own (registered with it): the tool reads
    // what the VMM handed out.
    let mut rendered = None;
    if let CtlCommand::Frontend { frontend, query, max, .. } = &args.command
        && let Some(tool) = iommu::registry::find(frontend).and_then(|r| r.tools.iter().find(|t| t.query == query))
    {
        let (body, text) = (tool.render)(&answer.body, &files, *max).map_err(|e| format!("{frontend} {query}: {e}"))?;
        answer.body = body;
        rendered = Some(text);
    }
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        serde_json::to_string_pretty(&answer.body).unwrap_or_default()
    } else {
        match &args.command {
            CtlCommand::Info => human_info(&answer.body),
            CtlCommand::Counters => human_counters(&answer.body, None, Duration::ZERO),
            CtlCommand::Frontend { .. } => rendered.unwrap_or_else(|| human_fields(&answer.body)),
            _ => format!("{endpoint}: ok {}", answer.body),
        }
    };
    let _ = writeln!(out, "{}", text.trim_end());
    Ok(ExitCode::SUCCESS)
}

/// One event for a human: `   12.345 s  device-gone dma0: why`.
pub fn human_event(line: &str) -> String {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(line) else { return line.to_string() };
    let ts = m.remove("ts").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let event = m.remove("event").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let rest: Vec<String> = m
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    format!("{ts:>10.3} s  {event:<14} {}", rest.join(" ")).trim_end().to_string()
}

/// A front-end's answer for a human: `key: value` lines.
fn human_fields(v: &Value) -> String {
    match v.as_object() {
        Some(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}: {s}\n"),
                other => format!("{k}: {other}\n"),
            })
            .collect(),
        None => v.to_string(),
    }
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// `ctl info` for a human.
pub fn human_info(v: &Value) -> String {
    let mut o = String::new();
    let run = &v["run"];
    o += &format!("VM {} on {} ({} pauses)\n", s(run, "state"), s(run, "accel"), u(run, &["pauses"]));
    o += "memory:\n";
    for r in v["memory"].as_array().into_iter().flatten() {
        let flag = if r["noncoherent"].as_bool() == Some(true) { " non-coherent" } else { "" };
        o += &format!(
            "  {:>14} {:>10} KiB  {}{flag}  (PAT WB -> {})\n",
            s(r, "gpa"),
            u(r, &["size"]) >> 10,
            s(r, "owner"),
            s(&r["memory_type"], "pat_wb")
        );
    }
    o += "devices:\n";
    for d in v["devices"].as_array().into_iter().flatten() {
        let gone = if d["gone"].as_bool() == Some(true) { " (gone)" } else { "" };
        let process = d["process"].as_u64().map_or("in the VMM".to_string(), |p| format!("process {p}"));
        o += &format!(
            "  {} {}{gone}: {process}, DMA by {}, {} mappings, interrupts {}, bus master {}\n",
            s(d, "name"),
            s(d, "bdf"),
            s(d, "frontend"),
            u(d, &["domain", "mapping_count"]),
            s(d, "irq_mode"),
            d["bus_master"].as_bool().unwrap_or(false)
        );
        for b in d["bars"].as_array().into_iter().flatten() {
            o += &format!(
                "      BAR{} {} {} bytes{}\n",
                u(b, &["bar"]),
                s(b, "addr"),
                u(b, &["size"]),
                if b["mmapped"].as_bool() == Some(true) { " (mmapped)" } else { "" }
            );
        }
        for i in d["interrupt_sources"].as_array().into_iter().flatten() {
            o += &format!("      irq {} {}\n", s(i, "source"), s(i, "mode"));
        }
    }
    o
}

/// One line of the counters: a counter (its rate shown) or a gauge (a level: none).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What it counts.
    pub name: String,
    /// Its value now.
    pub total: u64,
    /// Per second since the previous sample (None: a gauge, or no previous sample).
    pub rate: Option<f64>,
}

/// How `passthru stat` orders its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sort {
    /// Fastest-growing first (then by total).
    Rate,
    /// Largest total first.
    Total,
    /// By name.
    Name,
}

/// The rows of a `vm.counters` answer, rates against `prev` taken `dt` earlier.
pub fn rows(v: &Value, prev: Option<&Value>, dt: Duration) -> Vec<Row> {
    let rate = |now: u64, before: Option<u64>| -> Option<f64> {
        match (prev, before) {
            (Some(_), Some(b)) if !dt.is_zero() => Some(now.saturating_sub(b) as f64 / dt.as_secs_f64()),
            _ => None,
        }
    };
    let mut out = Vec::new();
    let mut counter = |name: String, path: Vec<&str>| {
        let now = u(v, &path);
        let before = prev.map(|p| u(p, &path));
        out.push(Row { name, total: now, rate: rate(now, before) });
    };
    for (k, _) in v["exits"].as_object().into_iter().flatten() {
        counter(format!("exits {k}"), vec!["exits", k]);
    }
    for d in v["devices"].as_object().into_iter().flatten() {
        for k in ["dma_maps", "dma_unmaps", "dma_faults", "bar_accesses"] {
            counter(format!("device {} {k}", d.0), vec!["devices", d.0, k]);
        }
    }
    // Front-ends' statistics: totals get a rate, gauges (below) none, text is not shown.
    let kinds = |fe: &str, k: &str| v["frontend_kinds"][fe][k].as_str().unwrap_or("total").to_string();
    for (fe, stats) in v["frontends"].as_object().into_iter().flatten() {
        for (k, _) in stats.as_object().into_iter().flatten() {
            if kinds(fe, k) == "total" {
                counter(format!("frontend {fe} {k}"), vec!["frontends", fe, k]);
            }
        }
    }
    for (id, i) in v["interrupts"].as_object().into_iter().flatten() {
        counter(format!("irq {id} ({}) by the VMM", s(i, "mode")), vec!["interrupts", id, "vmm_delivered"]);
    }
    // Hypercalls are a list: rates by matching entries.
    let key = |c: &Value| format!("hypercall {} {} {}", s(c, "nr"), s(c, "frontend"), s(c, "status"));
    for c in v["hypercalls"].as_array().into_iter().flatten() {
        let name = key(c);
        let before =
            prev.and_then(|p| p["hypercalls"].as_array()?.iter().find(|b| key(b) == name).map(|b| u(b, &["count"])));
        let now = u(c, &["count"]);
        out.push(Row { name, total: now, rate: rate(now, before.or(prev.map(|_| 0))) });
    }
    // Levels, not counts: no rate.
    let mut gauge = |name: String, path: Vec<&str>| out.push(Row { name, total: u(v, &path), rate: None });
    for d in v["devices"].as_object().into_iter().flatten() {
        gauge(format!("device {} mappings", d.0), vec!["devices", d.0, "mappings"]);
    }
    for (fe, stats) in v["frontends"].as_object().into_iter().flatten() {
        for (k, _) in stats.as_object().into_iter().flatten() {
            if v["frontend_kinds"][fe][k] == "gauge" {
                gauge(format!("frontend {fe} {k}"), vec!["frontends", fe, k]);
            }
        }
    }
    for k in ["locked", "pinned", "charged", "limit"] {
        gauge(format!("locked memory {k} (bytes)"), vec!["locked_memory", k]);
    }
    gauge("non-coherent devices".into(), vec!["noncoherent", "devices"]);
    out
}

/// Orders `rows` by `sort` and keeps those whose name contains `filter`.
pub fn arrange(mut rows: Vec<Row>, sort: Sort, filter: Option<&str>) -> Vec<Row> {
    if let Some(f) = filter {
        rows.retain(|r| r.name.contains(f));
    }
    match sort {
        Sort::Rate => rows.sort_by(|a, b| {
            let (x, y) = (a.rate.unwrap_or(-1.0), b.rate.unwrap_or(-1.0));
            y.total_cmp(&x).then(b.total.cmp(&a.total)).then(a.name.cmp(&b.name))
        }),
        Sort::Total => rows.sort_by(|a, b| b.total.cmp(&a.total).then(a.name.cmp(&b.name))),
        Sort::Name => rows.sort_by(|a, b| a.name.cmp(&b.name)),
    }
    rows
}

/// Rows as a table.
fn table(rows: &[Row]) -> String {
    let mut o = format!("{:<48} {:>16} {:>12}\n", "counter", "total", "per second");
    for r in rows {
        let rate = r.rate.map_or_else(|| format!("{:>12}", "-"), |x| format!("{x:>12.0}"));
        o += &format!("{:<48} {:>16} {rate}\n", r.name, r.total);
    }
    o
}

/// The counters for a human: totals, and rates against `prev` taken `dt` earlier
/// (gauges have none), in `ctl counters`' order.
pub fn human_counters(v: &Value, prev: Option<&Value>, dt: Duration) -> String {
    table(&rows(v, prev, dt))
}

/// `passthru stat`'s header: which VM, its process, state, uptime and devices.
fn stat_header(socket: &std::path::Path, v: &Value, sort: Sort, filter: Option<&str>, keys: bool) -> String {
    let run = &v["run"];
    let up = Duration::from_micros(u(run, &["uptime_us"]));
    let devices = v["devices"].as_object().map_or(0, |d| d.len());
    let mut h = format!(
        "VM {} — pid {}, {}, up {:.1} s, {devices} device(s); sorted by {}",
        socket.display(),
        u(run, &["pid"]),
        s(run, "state"),
        up.as_secs_f64(),
        format!("{sort:?}").to_lowercase()
    );
    if let Some(f) = filter {
        h += &format!(", only \"{f}\"");
    }
    if keys {
        h += " (keys: r rate, t total, n name, q quit)";
    }
    h
}

/// Standard input in non-canonical, no-echo mode while `passthru stat` runs on a
/// terminal (single keys change the sort); restored on drop.
struct Keys(Option<libc::termios>);

impl Keys {
    fn raw() -> Keys {
        if !std::io::stdin().is_terminal() {
            return Keys(None);
        }
        // SAFETY: tcgetattr fills a termios we own; tcsetattr applies a copy with
        // ICANON and ECHO cleared to our own standard input.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Keys(None);
            }
            let mut raw = t;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO);
            raw.c_cc[libc::VMIN] = 0;
            raw.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            Keys(Some(t))
        }
    }

    /// Waits up to `d` for a key; the key, if one came.
    fn wait(&self, d: Duration) -> Option<u8> {
        if self.0.is_none() {
            std::thread::sleep(d);
            return None;
        }
        let mut p = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(d.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd; then a one-byte read into a live buffer.
        unsafe {
            if libc::poll(&mut p, 1, ms) > 0 {
                let mut b = 0u8;
                if libc::read(0, (&raw mut b).cast(), 1) == 1 {
                    return Some(b);
                }
            }
        }
        None
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the saved attributes of our standard input.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

#[derive(Args, Debug)]
/// `passthru stat` arguments.
pub struct StatArgs {
    /// The API socket (`passthru run --api-socket PATH`).
    socket: PathBuf,
    /// Print one sample and exit.
    #[arg(long)]
    once: bool,
    /// Print samples as JSON lines ({"counters": ..., "rates": ...}).
    #[arg(long)]
    json: bool,
    /// Seconds between samples.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Order of the rows (on a terminal, keys r, t and n change it).
    #[arg(long, value_enum, default_value_t = Sort::Rate)]
    sort: Sort,
    /// Only the rows whose name contains TEXT (e.g. dma0, exits, hypercall).
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
}

/// Runs `passthru stat`: until the VM goes away (exit 0) or Ctrl-C.
pub fn stat(args: StatArgs) -> Result<ExitCode, String> {
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err("--interval must be a positive number of seconds".into());
    }
    let interval = Duration::from_secs_f64(args.interval);
    let terminal = std::io::stdout().is_terminal();
    let keys = if terminal && !args.once && !args.json { Keys::raw() } else { Keys(None) };
    let mut sort = args.sort;
    let mut prev: Option<(Value, Instant)> = None;
    loop {
        let answer = match api::client::call(&args.socket, "GET", "vm.counters", None, CLIENT_TIMEOUT) {
            Ok(a) => a,
            // The VM ended between two samples: that is the normal end of a session.
            Err(_) if prev.is_some() => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e),
        };
        if answer.status != 200 {
            return Err(format!("vm.counters: {} ({})", answer.message(), answer.status));
        }
        let now = Instant::now();
        let dt = prev.as_ref().map_or(Duration::ZERO, |p| now.duration_since(p.1));
        let sample = rows(&answer.body, prev.as_ref().map(|p| &p.0), dt);
        let draw = |sort: Sort| -> std::io::Result<()> {
            let mut out = std::io::stdout().lock();
            if args.json {
                let rates = prev.as_ref().map(|p| rates(&answer.body, &p.0, dt));
                writeln!(out, "{}", json!({ "counters": answer.body, "rates": rates }))?;
            } else {
                let clear = if terminal && !args.once { "\x1b[H\x1b[2J" } else { "" };
                let filter = args.filter.as_deref();
                let header = stat_header(&args.socket, &answer.body, sort, filter, keys.0.is_some());
                let rows = arrange(sample.clone(), sort, filter);
                writeln!(out, "{clear}{header}\n\n{}", table(&rows).trim_end())?;
            }
            out.flush()
        };
        if draw(sort).is_err() || args.once {
            return Ok(ExitCode::SUCCESS);
        }
        // Until the next sample: keys change the order of this one.
        let until = Instant::now() + interval;
        while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            let new = match keys.wait(left) {
                Some(b'q') => return Ok(ExitCode::SUCCESS),
                Some(b'r') => Sort::Rate,
                Some(b't') => Sort::Total,
                Some(b'n') => Sort::Name,
                _ => continue,
            };
            sort = new;
            if draw(sort).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
        }
        prev = Some((answer.body, now));
    }
}

/// Per-second rates of every numeric counter that grew, as a flat object keyed by
/// its path (`exits.io_out`, `devices.dma0.dma_maps`...).
pub fn rates(now: &Value, before: &Value, dt: Duration) -> Value {
    let mut out = serde_json::Map::new();
    fn walk(n: &Value, b: &Value, path: String, dt: f64, out: &mut serde_json::Map<String, Value>) {
        match n {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    walk(v, &b[k.as_str()], p, dt, out);
                }
            }
            Value::Number(x) => {
                if let (Some(x), Some(y)) = (x.as_u64(), b.as_u64())
                    && x > y
                    && dt > 0.0
                {
                    out.insert(path, json!((x - y) as f64 / dt));
                }
            }
            _ => {}
        }
    }
    walk(now, before, String::new(), dt.as_secs_f64(), &mut out);
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_per_second_of_counters_that_grew() {
        let a = json!({ "exits": { "io_out": 10, "io_in": 5 }, "run": { "state": "running" } });
        let b = json!({ "exits": { "io_out": 30, "io_in": 5 }, "run": { "state": "running" } });
        assert_eq!(rates(&b, &a, Duration::from_secs(2)), json!({ "exits.io_out": 10.0 }));
        let text = human_counters(&b, Some(&a), Duration::from_secs(2));
        assert!(text.lines().any(|l| l.starts_with("exits io_out") && l.ends_with(" 10")), "{text}");
    }

    #[test]
    fn gauges_have_no_rate_and_rows_sort_and_filter() {
        let a = json!({ "exits": { "io_out": 10, "io_in": 5, "mmio_read": 0 },
                        "locked_memory": { "limit": 100, "locked": 10 } });
        let b = json!({ "exits": { "io_out": 30, "io_in": 25, "mmio_read": 1 },
                        "locked_memory": { "limit": 100, "locked": 50 } });
        let r = rows(&b, Some(&a), Duration::from_secs(1));
        let limit = r.iter().find(|x| x.name == "locked memory limit (bytes)").unwrap();
        assert_eq!((limit.total, limit.rate), (100, None), "a level, not a count: no rate");
        let names = |v: Vec<Row>| v.into_iter().map(|x| x.name).collect::<Vec<_>>();
        let by_rate = names(arrange(r.clone(), Sort::Rate, Some("exits")));
        assert_eq!(by_rate, ["exits io_out", "exits io_in", "exits mmio_read"], "equal rates: the larger total first");
        let by_name = names(arrange(r.clone(), Sort::Name, Some("exits")));
        assert_eq!(by_name, ["exits io_in", "exits io_out", "exits mmio_read"]);
        assert_eq!(names(arrange(r, Sort::Total, Some("locked"))).len(), 4);
    }
}
