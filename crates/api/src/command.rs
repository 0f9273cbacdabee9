//! The endpoints and their requests: `decode` turns a method, a path and a JSON body
//! into a [`Command`], or the error answer naming what is wrong. Pure: the fuzz target
//! `api_request` drives it with [`crate::http::parse_request`].

use crate::{ApiError, PREFIX};
use serde::Deserialize;

/// One endpoint: its name under `/api/v1/`, its method, what its body holds.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    /// Name, e.g. `vm.info`.
    pub name: &'static str,
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// The body's fields (empty: no body).
    pub body: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Every endpoint, in the order `passthru ctl --help` lists them.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        name: "vm.info",
        method: "GET",
        body: "",
        help: "memory map (with non-coherent flags and memory types), devices (BDF, BARs, DMA front-end, domain mappings, interrupt sources and modes), run state",
    },
    Endpoint { name: "vm.counters", method: "GET", body: "", help: "every counter the VMM keeps" },
    Endpoint {
        name: "vm.add-device",
        method: "PUT",
        body: r#"{"device": "dma-engine[,dma=...][,process=inline][,coherent=false]..." | "vfio-user,socket=PATH[,...]"}"#,
        help: "hot-plug a device (the --device syntax); the guest finds it by polling the bus",
    },
    Endpoint {
        name: "vm.remove-device",
        method: "PUT",
        body: r#"{"name": "dma0"}"#,
        help: "hot-unplug a device: DMA stopped and unmapped, interrupts detached, process reaped",
    },
    Endpoint { name: "vm.pause", method: "PUT", body: "", help: "stop the vCPU at an instruction boundary" },
    Endpoint { name: "vm.resume", method: "PUT", body: "", help: "let a paused vCPU run again" },
    Endpoint {
        name: "vm.shutdown",
        method: "PUT",
        body: r#"optional {"status": 0}"#,
        help: "stop the VM; passthru exits with the status",
    },
    Endpoint {
        name: "irq.set-mode",
        method: "PUT",
        body: r#"{"source": "dma0/1/0", "mode": "forwarded" | "vmm"}"#,
        help: "who delivers one interrupt source: KVM (irqfd) or the VMM; switched live without loss",
    },
    Endpoint {
        name: "memory.add",
        method: "PUT",
        body: r#"{"gpa": "0x100000000", "size": "256M"}"#,
        help: "hot-add RAM (the guest is not told)",
    },
    Endpoint {
        name: "vm.snapshot",
        method: "PUT",
        body: r#"{"dir": "/path/to/snapshot"}"#,
        help: "save the VM (vCPU, irqchip, RAM, devices and their DMA domains) to a directory, atomically; restore with passthru run --restore DIR",
    },
    Endpoint {
        name: "frontend.query",
        method: "PUT",
        body: r#"{"frontend": "tce", "query": "table", "arg": "0x1000"}"#,
        help: "a DMA front-end's own query (its list: vm.info's frontends): its fields, and any files it hands out passed with SCM_RIGHTS on this connection (e.g. tce's table: the table's memfd to map read-only and walk by abi::tce::layout)",
    },
    Endpoint {
        name: "events",
        method: "GET",
        body: "",
        help: "the VM's event stream: one JSON object per line (chunked), {\"ts\", \"event\", ...}, until the client leaves or the VM ends",
    },
    Endpoint {
        name: "memory.remove",
        method: "PUT",
        body: r#"{"gpa": "0x100000000"}"#,
        help: "hot-remove RAM added with memory.add; devices lose it first",
    },
];

/// A decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `GET vm.info`.
    Info,
    /// `GET vm.counters`.
    Counters,
    /// `PUT vm.add-device`: a `--device` specification.
    AddDevice {
        /// E.g. `dma-engine,dma=pvdma`.
        device: String,
    },
    /// `PUT vm.remove-device`.
    RemoveDevice {
        /// The device's name (`dma0`...).
        name: String,
    },
    /// `PUT vm.pause`.
    Pause,
    /// `PUT vm.resume`.
    Resume,
    /// `PUT vm.shutdown`.
    Shutdown {
        /// The exit status passthru ends with.
        status: u8,
    },
    /// `PUT irq.set-mode`.
    IrqSetMode {
        /// Device name of the source.
        device: String,
        /// Interrupt index (VFIO_PCI_*_IRQ_INDEX).
        index: u32,
        /// Vector within the index.
        sub: u32,
        /// `forwarded` or `vmm`.
        mode: String,
    },
    /// `PUT memory.add`.
    MemoryAdd {
        /// Guest-physical start.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// `PUT vm.snapshot`.
    Snapshot {
        /// The directory to write (replaced atomically if it exists).
        dir: String,
    },
    /// `PUT memory.remove`.
    MemoryRemove {
        /// Guest-physical start of a region added with `memory.add`.
        gpa: u64,
    },
    /// `PUT frontend.query`: a DMA front-end's own query, and any files it hands out
    /// with the answer.
    FrontendQuery {
        /// The front-end's name.
        frontend: String,
        /// The query's name.
        query: String,
        /// Its argument.
        arg: String,
    },
    /// `GET events`: a stream of JSON lines, not one answer.
    Events,
}

/// A number in a body: a JSON number, or a string (`0x` hexadecimal, decimal, or a
/// size with a K, M or G suffix).
#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    Int(u64),
    Text(String),
}

impl Num {
    fn value(&self, field: &str) -> Result<u64, ApiError> {
        match self {
            Num::Int(n) => Ok(*n),
            Num::Text(s) => parse_number(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "\"{field}\": '{s}' is not a number (write 4096, \"0x1000\" or \"256M\")"
                ))
            }),
        }
    }
}

/// Parses `0x` hexadecimal, decimal, or decimal with a K/M/G suffix (powers of 1024).
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDeviceBody {
    device: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    #[serde(default)]
    status: Option<Num>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IrqBody {
    source: String,
    mode: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontendQueryBody {
    frontend: String,
    query: String,
    #[serde(default)]
    arg: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryAddBody {
    gpa: Num,
    size: Num,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryRemoveBody {
    gpa: Num,
}

/// Decodes one request. 404 for a path outside `/api/v1/` or an unknown endpoint,
/// 405 for the wrong method, 400 for a body that is not what the endpoint takes.
pub fn decode(method: &str, path: &str, body: &[u8]) -> Result<Command, ApiError> {
    let name = path.strip_prefix(PREFIX).ok_or_else(|| {
        ApiError::not_found(format!("no endpoint at '{}': endpoints are under {PREFIX}", printable(path)))
    })?;
    let endpoint = ENDPOINTS.iter().find(|e| e.name == name).ok_or_else(|| {
        let names: Vec<&str> = ENDPOINTS.iter().map(|e| e.name).collect();
        ApiError::not_found(format!("no endpoint '{}'; there are: {}", printable(name), names.join(", ")))
    })?;
    if method != endpoint.method {
        return Err(ApiError {
            status: 405,
            message: format!("{} takes {}, not {}", endpoint.name, endpoint.method, printable(method)),
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    let b = Body { endpoint, text };
    Ok(match endpoint.name {
        "vm.info" => b.none().map(|()| Command::Info)?,
        "vm.counters" => b.none().map(|()| Command::Counters)?,
        "events" => b.none().map(|()| Command::Events)?,
        "vm.pause" => b.none().map(|()| Command::Pause)?,
        "vm.resume" => b.none().map(|()| Command::Resume)?,
        "vm.shutdown" => shutdown(&b)?,
        "vm.add-device" => {
            let d: AddDeviceBody = b.parse()?;
            if d.device.trim().is_empty() {
                return Err(ApiError::bad_request("\"device\" is empty: give a --device specification"));
            }
            Command::AddDevice { device: d.device }
        }
        "vm.remove-device" => Command::RemoveDevice { name: b.parse::<NameBody>()?.name },
        "irq.set-mode" => irq_set_mode(b.parse()?)?,
        "memory.add" => {
            let m: MemoryAddBody = b.parse()?;
            Command::MemoryAdd { gpa: m.gpa.value("gpa")?, size: m.size.value("size")? }
        }
        "frontend.query" => {
            let q: FrontendQueryBody = b.parse()?;
            if q.frontend.is_empty() || q.query.is_empty() {
                return Err(ApiError::bad_request(
                    "\"frontend\" and \"query\" name a front-end and one of its queries",
                ));
            }
            Command::FrontendQuery { frontend: q.frontend, query: q.query, arg: q.arg }
        }
        "vm.snapshot" => {
            let d: SnapshotBody = b.parse()?;
            if d.dir.trim().is_empty() {
                return Err(ApiError::bad_request("\"dir\" is empty: give the snapshot's directory"));
            }
            Command::Snapshot { dir: d.dir }
        }
        "memory.remove" => Command::MemoryRemove { gpa: b.parse::<MemoryRemoveBody>()?.gpa.value("gpa")? },
        other => return Err(ApiError::internal(format!("endpoint {other} has no decoder"))),
    })
}

/// A request's body, for its endpoint.
struct Body<'a> {
    endpoint: &'a Endpoint,
    text: &'a str,
}

impl Body<'_> {
    fn is_empty(&self) -> bool {
        self.text.trim().is_empty()
    }

    /// The body as JSON (an empty one is refused, naming what was expected).
    fn json(&self, what: &str) -> Result<serde_json::Value, ApiError> {
        if self.is_empty() {
            return Err(ApiError::bad_request(format!("{} needs a JSON body: {what}", self.endpoint.name)));
        }
        serde_json::from_str(self.text).map_err(|e| {
            ApiError::bad_request(format!("{}: the body is not JSON ({e}); expected {what}", self.endpoint.name))
        })
    }

    /// The body as the endpoint's fields.
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_value(self.json(self.endpoint.body)?)
            .map_err(|e| ApiError::bad_request(format!("{}: {e}; expected {}", self.endpoint.name, self.endpoint.body)))
    }

    /// No body (or `{}`).
    fn none(&self) -> Result<(), ApiError> {
        if self.is_empty() || self.text.trim() == "{}" {
            Ok(())
        } else {
            Err(ApiError::bad_request(format!("{} takes no body", self.endpoint.name)))
        }
    }
}

/// `vm.shutdown`, its status 0 by default.
fn shutdown(b: &Body<'_>) -> Result<Command, ApiError> {
    let s: ShutdownBody = if b.is_empty() {
        ShutdownBody::default()
    } else {
        serde_json::from_value(b.json("{}")?).map_err(|e| ApiError::bad_request(format!("vm.shutdown: {e}")))?
    };
    let status = match s.status {
        None => 0,
        Some(n) => u8::try_from(n.value("status")?)
            .map_err(|_| ApiError::bad_request("\"status\" is an exit status: 0..=255"))?,
    };
    Ok(Command::Shutdown { status })
}

/// `irq.set-mode`: a source named DEVICE/INDEX/SUB and a mode.
fn irq_set_mode(b: IrqBody) -> Result<Command, ApiError> {
    let parts: Vec<&str> = b.source.split('/').collect();
    let bad = || {
        ApiError::bad_request(format!(
            "\"source\": '{}' is not DEVICE/INDEX/SUB (see vm.info's interrupt sources)",
            printable(&b.source)
        ))
    };
    let [device, index, sub] = parts[..] else { return Err(bad()) };
    let (index, sub) = (index.parse().map_err(|_| bad())?, sub.parse().map_err(|_| bad())?);
    if !matches!(b.mode.as_str(), "forwarded" | "vmm") {
        return Err(ApiError::bad_request(format!("\"mode\": '{}': use forwarded or vmm", printable(&b.mode))));
    }
    Ok(Command::IrqSetMode { device: device.to_string(), index, sub, mode: b.mode })
}

/// At most 80 characters of client text, control characters escaped, for messages.
fn printable(s: &str) -> String {
    s.chars().take(80).flat_map(char::escape_debug).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, name: &str, body: &str) -> Command {
        decode(method, &format!("{PREFIX}{name}"), body.as_bytes()).unwrap()
    }

    fn err(method: &str, path: &str, body: &str) -> ApiError {
        decode(method, path, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn every_endpoint_decodes_its_body() {
        assert_eq!(ok("GET", "vm.info", ""), Command::Info);
        assert_eq!(ok("GET", "vm.counters", ""), Command::Counters);
        assert_eq!(ok("PUT", "vm.pause", ""), Command::Pause);
        assert_eq!(ok("PUT", "vm.resume", "{}"), Command::Resume);
        assert_eq!(ok("PUT", "vm.shutdown", ""), Command::Shutdown { status: 0 });
        assert_eq!(ok("PUT", "vm.shutdown", r#"{"status": 3}"#), Command::Shutdown { status: 3 });
        assert_eq!(
            ok("PUT", "vm.add-device", r#"{"device": "dma-engine,dma=pvdma"}"#),
            Command::AddDevice { device: "dma-engine,dma=pvdma".into() }
        );
        assert_eq!(ok("PUT", "vm.remove-device", r#"{"name":"dma0"}"#), Command::RemoveDevice { name: "dma0".into() });
        assert_eq!(
            ok("PUT", "irq.set-mode", r#"{"source":"dma0/2/1","mode":"vmm"}"#),
            Command::IrqSetMode { device: "dma0".into(), index: 2, sub: 1, mode: "vmm".into() }
        );
        assert_eq!(
            ok("PUT", "memory.add", r#"{"gpa":"0x100000000","size":"256M"}"#),
            Command::MemoryAdd { gpa: 1 << 32, size: 256 << 20 }
        );
        assert_eq!(
            ok("PUT", "memory.add", r#"{"gpa":4096,"size":8192}"#),
            Command::MemoryAdd { gpa: 4096, size: 8192 }
        );
        assert_eq!(ok("PUT", "memory.remove", r#"{"gpa":"4096"}"#), Command::MemoryRemove { gpa: 4096 });
        assert_eq!(ok("PUT", "vm.snapshot", r#"{"dir":"/tmp/s"}"#), Command::Snapshot { dir: "/tmp/s".into() });
    }

    #[test]
    fn a_frontend_query_names_the_front_end_and_the_query() {
        assert_eq!(
            ok("PUT", "frontend.query", r#"{"frontend": "tce", "query": "table", "arg": "0x1000"}"#),
            Command::FrontendQuery { frontend: "tce".into(), query: "table".into(), arg: "0x1000".into() }
        );
        let e = err("PUT", &format!("{PREFIX}frontend.query"), r#"{"frontend": "", "query": "table"}"#);
        assert!(e.status == 400 && e.message.contains("name a front-end"), "{}", e.message);
        assert_eq!(err("PUT", &format!("{PREFIX}frontend.query"), r#"{"frontend": "tce"}"#).status, 400);
        assert_eq!(err("PUT", &format!("{PREFIX}frontend.query"), "").status, 400);
    }

    #[test]
    fn errors_name_the_problem_with_their_status() {
        let e = err("GET", "/api/v2/vm.info", "");
        assert_eq!(e.status, 404);
        assert!(e.message.contains("/api/v1/"), "{e}");
        let e = err("GET", "/api/v1/vm.nope", "");
        assert!(e.status == 404 && e.message.contains("vm.info"), "{e}");
        let e = err("PUT", "/api/v1/vm.info", "");
        assert!(e.status == 405 && e.message.contains("GET"), "{e}");
        let e = err("PUT", "/api/v1/vm.add-device", "");
        assert!(e.status == 400 && e.message.contains("needs a JSON body"), "{e}");
        let e = err("PUT", "/api/v1/vm.add-device", "{not json");
        assert!(e.status == 400 && e.message.contains("not JSON"), "{e}");
        let e = err("PUT", "/api/v1/vm.add-device", r#"{"dev":"x"}"#);
        assert!(e.status == 400 && e.message.contains("dev"), "{e}");
        let e = err("PUT", "/api/v1/irq.set-mode", r#"{"source":"dma0/x/0","mode":"vmm"}"#);
        assert!(e.status == 400 && e.message.contains("DEVICE/INDEX/SUB"), "{e}");
        let e = err("PUT", "/api/v1/irq.set-mode", r#"{"source":"dma0/1/0","mode":"fast"}"#);
        assert!(e.status == 400 && e.message.contains("forwarded or vmm"), "{e}");
        let e = err("PUT", "/api/v1/memory.add", r#"{"gpa":"lots","size":1}"#);
        assert!(e.status == 400 && e.message.contains("gpa"), "{e}");
        let e = err("PUT", "/api/v1/vm.shutdown", r#"{"status":256}"#);
        assert_eq!(e.status, 400);
        let e = err("PUT", "/api/v1/vm.pause", r#"{"now":true}"#);
        assert!(e.status == 400 && e.message.contains("no body"), "{e}");
        assert_eq!(err("GET", "/api/v1/vm.info", "\u{0}\u{ff}").status, 400);
    }

    #[test]
    fn numbers_take_hex_decimal_and_sizes() {
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("16"), Some(16));
        assert_eq!(parse_number("2M"), Some(2 << 20));
        assert_eq!(parse_number("1g"), Some(1 << 30));
        assert_eq!(parse_number("99999999999999999G"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("M"), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(method in "[A-Z]{0,6}", path in ".{0,40}", body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&method, &path, &body);
            let _ = decode("PUT", &format!("{PREFIX}memory.add"), &body);
        }
    }
}
