//! Request traces: what `passthru run --record FILE` writes and `passthru replay
//! virtio-iommu FILE` reads. One line each, `#` starts a comment, `t=` (seconds) is
//! ignored on reading:
//!
//! ```text
//! PHASE <name> t=..
//! KICK t=..
//! PROBE endpoint=0x.. resv=msi:0xSTART-0xEND t=..
//! ATTACH domain=N endpoint=0x.. t=..
//! DETACH domain=N endpoint=0x.. t=..
//! MAP domain=N virt_start=0x.. virt_end=0x.. phys_start=0x.. flags=0x.. t=..
//! UNMAP domain=N virt_start=0x.. virt_end=0x.. t=..
//! ```
//!
//! Ends are inclusive; MAP flags are 1 READ, 2 WRITE, 4 MMIO. A request may carry the
//! status it got (`status=OK`, or a number) and ATTACH its flags (`flags=0x1`,
//! BYPASS); a request without a status was expected to succeed. A KICK is the
//! notification that sent the requests before it.

use super::wire::Request;
use abi::viommu::status;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// One line of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A named phase starts.
    Phase(String),
    /// The requests so far were sent.
    Kick,
    /// A request, the status it got, and for PROBE the MSI region it reported.
    Request {
        /// The request.
        request: Request,
        /// Its status as recorded (None: not recorded; expected OK).
        status: Option<u8>,
        /// PROBE: the RESV_MEM MSI region (inclusive) it answered with.
        resv: Option<(u64, u64)>,
    },
}

/// A request as answered: the request, its status, and for PROBE its MSI region.
pub type Answered = (Request, u8, Option<(u64, u64)>);

/// An item and the line it came from (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Line number.
    pub line: usize,
    /// What it says.
    pub item: Item,
}

const STATUS_NAMES: [&str; 9] = ["OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT", "FAULT", "NOMEM"];

/// A status's name (`OK`, `INVAL`...), or its number.
pub fn status_name(s: u8) -> String {
    STATUS_NAMES.get(usize::from(s)).map_or_else(|| s.to_string(), |n| (*n).to_string())
}

/// A decimal or `0x` hexadecimal number.
pub(crate) fn number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a number"))
}

fn parse_status(s: &str) -> Result<u8, String> {
    if let Some(i) = STATUS_NAMES.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(i as u8);
    }
    let n = number(s)?;
    u8::try_from(n).map_err(|_| format!("status {s} is out of range"))
}

/// `resv=msi:0xSTART-0xEND`.
fn parse_resv(s: &str) -> Result<(u64, u64), String> {
    let r = s.strip_prefix("msi:").ok_or_else(|| format!("resv={s}: expected msi:0xSTART-0xEND"))?;
    let (a, b) = r.split_once('-').ok_or_else(|| format!("resv={s}: expected msi:0xSTART-0xEND"))?;
    Ok((number(a)?, number(b)?))
}

/// The `key=value` fields of one line.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn num(&self, key: &str) -> Result<u64, String> {
        number(self.get(key).ok_or_else(|| format!("{key}= is missing"))?)
    }

    fn u32(&self, key: &str) -> Result<u32, String> {
        let n = self.num(key)?;
        u32::try_from(n).map_err(|_| format!("{key}={n:#x} does not fit 32 bits"))
    }
}

fn parse_line(words: &[&str]) -> Result<Option<Item>, String> {
    let Some((&kind, rest)) = words.split_first() else { return Ok(None) };
    if kind == "PHASE" {
        let name = rest.iter().filter(|w| !w.starts_with("t=")).copied().collect::<Vec<_>>().join(" ");
        return Ok(Some(Item::Phase(name)));
    }
    let mut fields = Vec::new();
    for w in rest {
        let (k, v) = w.split_once('=').ok_or_else(|| format!("'{w}' is not key=value"))?;
        fields.push((k, v));
    }
    let f = Fields(fields);
    let request = match kind {
        "KICK" => return Ok(Some(Item::Kick)),
        "PROBE" => Request::Probe { endpoint: f.u32("endpoint")? },
        "ATTACH" => Request::Attach {
            domain: f.u32("domain")?,
            endpoint: f.u32("endpoint")?,
            flags: if f.get("flags").is_some() { f.u32("flags")? } else { 0 },
            reserved: false,
        },
        "DETACH" => Request::Detach { domain: f.u32("domain")?, endpoint: f.u32("endpoint")? },
        "MAP" => Request::Map {
            domain: f.u32("domain")?,
            virt_start: f.num("virt_start")?,
            virt_end: f.num("virt_end")?,
            phys_start: f.num("phys_start")?,
            flags: f.u32("flags")?,
        },
        "UNMAP" => Request::Unmap {
            domain: f.u32("domain")?,
            virt_start: f.num("virt_start")?,
            virt_end: f.num("virt_end")?,
            reserved: false,
        },
        other => return Err(format!("'{other}' is not PHASE, KICK, PROBE, ATTACH, DETACH, MAP or UNMAP")),
    };
    let status = f.get("status").map(parse_status).transpose()?;
    let resv = f.get("resv").map(parse_resv).transpose()?;
    Ok(Some(Item::Request { request, status, resv }))
}

/// Reads a trace. An error names the line and what is wrong with it.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let words: Vec<&str> = line.split_whitespace().collect();
        match parse_line(&words) {
            Ok(Some(item)) => out.push(Entry { line: i + 1, item }),
            Ok(None) => {}
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
    }
    Ok(out)
}

/// One request as a trace line (without `t=`).
pub fn format(r: &Request, status: Option<u8>, resv: Option<(u64, u64)>) -> String {
    let mut s = match *r {
        Request::Probe { endpoint } => format!("PROBE endpoint={endpoint:#x}"),
        Request::Attach { domain, endpoint, flags, .. } => {
            let f = if flags != 0 { format!(" flags={flags:#x}") } else { String::new() };
            format!("ATTACH domain={domain} endpoint={endpoint:#x}{f}")
        }
        Request::Detach { domain, endpoint } => format!("DETACH domain={domain} endpoint={endpoint:#x}"),
        Request::Map { domain, virt_start, virt_end, phys_start, flags } => format!(
            "MAP domain={domain} virt_start={virt_start:#x} virt_end={virt_end:#x} phys_start={phys_start:#x} flags={flags:#x}"
        ),
        Request::Unmap { domain, virt_start, virt_end, .. } => {
            format!("UNMAP domain={domain} virt_start={virt_start:#x} virt_end={virt_end:#x}")
        }
    };
    if let Some((a, b)) = resv {
        s += &format!(" resv=msi:{a:#x}-{b:#x}");
    }
    if let Some(st) = status {
        s += &format!(" status={}", status_name(st));
    }
    s
}

/// Writes the requests a device answers, as a trace.
pub struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    start: Instant,
    path: String,
}

impl Recorder {
    /// A recorder writing to `path` (created, or truncated).
    pub fn create(path: &str) -> std::io::Result<Recorder> {
        let f = std::fs::File::create(path)?;
        let mut out = std::io::BufWriter::new(f);
        writeln!(out, "# virtio-iommu requests recorded by passthru; replay: passthru replay virtio-iommu FILE")?;
        Ok(Recorder { out: Mutex::new(out), start: Instant::now(), path: path.to_string() })
    }

    /// Where it writes.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// One kick's requests (answered), then the KICK.
    pub fn kick(&self, answered: &[Answered]) {
        let t = self.start.elapsed().as_secs_f64();
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = || -> std::io::Result<()> {
            for (r, st, resv) in answered {
                writeln!(out, "{} t={t:.6}", format(r, Some(*st), *resv))?;
            }
            writeln!(out, "KICK t={t:.6}")?;
            out.flush()
        };
        if let Err(e) = w() {
            tracing::warn!("virtio-iommu: recording to {}: {e}", self.path);
        }
    }
}

/// The status a request is expected to get when its trace line records none.
pub const EXPECTED_DEFAULT: u8 = status::OK;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_formats_to_a_line_that_parses_back() {
        let all = [
            (Request::Probe { endpoint: 8 }, Some((0xfee0_0000, 0xfeef_ffff))),
            (Request::Attach { domain: 1, endpoint: 8, flags: 1, reserved: false }, None),
            (Request::Attach { domain: 1, endpoint: 8, flags: 0, reserved: false }, None),
            (Request::Detach { domain: 1, endpoint: 8 }, None),
            (Request::Map { domain: 2, virt_start: 0x1000, virt_end: 0x1fff, phys_start: 0x5000, flags: 3 }, None),
            (Request::Unmap { domain: 2, virt_start: 0, virt_end: u64::MAX, reserved: false }, None),
        ];
        for (st, (r, resv)) in all.iter().enumerate() {
            let line = format!("{} t=1.5", format(r, Some(st as u8), *resv));
            let parsed = parse(&line).unwrap();
            assert_eq!(
                parsed,
                vec![Entry { line: 1, item: Item::Request { request: *r, status: Some(st as u8), resv: *resv } }]
            );
        }
    }

    #[test]
    fn comments_phases_kicks_and_errors_name_their_line() {
        let t = "# a comment\nPHASE boot t=0.1\n\nATTACH domain=1 endpoint=0x8 t=0.2 # trailing\nKICK t=0.2\n";
        let p = parse(t).unwrap();
        assert_eq!(p[0], Entry { line: 2, item: Item::Phase("boot".into()) });
        assert_eq!(p[2], Entry { line: 5, item: Item::Kick });
        assert!(matches!(p[1].item, Item::Request { status: None, .. }));
        assert_eq!(parse("KICK\nMAP domain=1 t=0").unwrap_err(), "line 2: virt_start= is missing");
        assert_eq!(
            parse("FOO x=1").unwrap_err(),
            "line 1: 'FOO' is not PHASE, KICK, PROBE, ATTACH, DETACH, MAP or UNMAP"
        );
        assert_eq!(
            parse("ATTACH domain=0x100000000 endpoint=1").unwrap_err(),
            "line 1: domain=0x100000000 does not fit 32 bits"
        );
        assert_eq!(parse("PROBE endpoint=1 status=BOGUS").unwrap_err(), "line 1: 'BOGUS' is not a number");
        assert_eq!(
            parse("PROBE endpoint=1 status=inval").unwrap()[0].item,
            Item::Request { request: Request::Probe { endpoint: 1 }, status: Some(status::INVAL), resv: None }
        );
    }
}
