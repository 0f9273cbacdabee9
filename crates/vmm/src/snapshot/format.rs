//! The snapshot format, apart from what a VM puts in it: a directory of section files
//! listed with their sizes and CRC32C checksums in `manifest.json`, written beside
//! the target and swapped in at once, read back through checked readers. Nothing here
//! knows a VM: `Snapshot::load` and the fuzz target `snapshot_format` use it alone.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn err(what: impl Into<String>) -> Error {
    Error::Snapshot(what.into())
}

/// The format's name in every manifest.
pub const FORMAT: &str = "passthru-snapshot";
/// The format's version: a snapshot of another version is refused. Version 2 saved
/// the vCPU's CPUID; version 3 each DMA front-end's state as one typed section;
/// version 4 is the VM's layout and a set of typed, versioned sections keyed by
/// component (vCPU, irqchip, memory, each device, each front-end, the interrupt
/// sources).
pub const VERSION: u32 = 4;
/// First bytes of `ram.bin` and `devmem.bin`.
pub const DATA_MAGIC: &[u8; 8] = b"PTDATA1\0";
/// Largest `vm.json` accepted.
pub const MAX_STATE_JSON: u64 = 256 << 20;
/// Largest `manifest.json` accepted.
pub const MAX_MANIFEST: u64 = 1 << 20;
/// Bytes moved at a time between guest memory and the files.
pub const CHUNK: usize = 4 << 20;
/// The sections a snapshot holds; `hotram` may be absent.
pub const SECTIONS: [&str; 4] = ["vm", "ram", "hotram", "devmem"];

/// The manifest: what the directory holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The passthru version that wrote it.
    pub writer: String,
    /// Every section.
    pub sections: Vec<SectionFile>,
}

/// One file of the snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SectionFile {
    /// `vm`, `ram`, `devmem`.
    pub name: String,
    /// Its file in the directory.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// CRC32C of its bytes.
    pub crc32c: u32,
}

/// A file being written, its CRC32C and size kept.
pub struct Out {
    file: std::fs::File,
    crc: u32,
    /// Bytes written so far.
    pub bytes: u64,
}

impl Out {
    /// Creates `path` (mode 0600; it must not exist).
    pub fn create(path: &Path) -> Result<Out> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| err(format!("creating {}: {e}", path.display())))?;
        Ok(Out { file, crc: 0, bytes: 0 })
    }

    /// Appends `b`, checksummed.
    pub fn put(&mut self, b: &[u8]) -> Result<()> {
        self.file.write_all(b).map_err(|e| err(format!("writing the snapshot: {e}")))?;
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Syncs the file: its manifest entry as section `name`.
    pub fn finish(self, name: &str, file: &str) -> Result<SectionFile> {
        self.file.sync_all().map_err(|e| err(format!("syncing {file}: {e}")))?;
        Ok(SectionFile { name: name.into(), file: file.into(), bytes: self.bytes, crc32c: self.crc })
    }
}

/// A snapshot replaces only a snapshot: an existing `dir` must hold a passthru
/// manifest (anything else is refused, never deleted).
pub fn check_target(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let is_snapshot = std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
        .is_some_and(|m| m.format == FORMAT);
    if is_snapshot {
        Ok(())
    } else {
        Err(err(format!("{} exists and is not a passthru snapshot: pick another directory", dir.display())))
    }
}

/// The directory a snapshot is written to, beside its target (`.NAME.tmp-PID`,
/// 0700): removed on drop unless swapped in.
pub struct TempDir {
    /// Where it is.
    pub path: PathBuf,
    kept: bool,
}

impl TempDir {
    /// A fresh directory beside `dir` (an old one of this process removed first).
    pub fn beside(dir: &Path) -> Result<TempDir> {
        let name = dir.file_name().ok_or_else(|| err(format!("{}: not a directory name", dir.display())))?;
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let path = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        // Guest memory inside: private to the owner, as the API socket is.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| err(format!("creating {}: {e}", path.display())))?;
        Ok(TempDir { path, kept: false })
    }

    /// Puts the directory at `dir` in one step: a plain rename if `dir` does not
    /// exist, else an atomic exchange (the old snapshot, now here, is then removed).
    pub fn swap_into(mut self, dir: &Path) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| err("a path with a NUL byte"));
        let (a, b) = (c(&self.path)?, c(dir)?);
        let flags = if dir.exists() { libc::RENAME_EXCHANGE } else { libc::RENAME_NOREPLACE };
        // SAFETY: two valid NUL-terminated paths; renameat2 only renames.
        let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(format!("putting the snapshot at {}: {e}", dir.display())));
        }
        // After an exchange this directory holds the old snapshot: drop removes it.
        self.kept = flags != libc::RENAME_EXCHANGE;
        if let Some(p) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::File::open(p).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes `vm.json` (`state`, JSON) and the manifest beside the data sections already
/// in `tmp`, and syncs the directory; returns the bytes of every section.
pub fn finish_dir(tmp: &Path, state: &[u8], mut sections: Vec<SectionFile>) -> Result<u64> {
    let mut v = Out::create(&tmp.join("vm.json"))?;
    v.put(state)?;
    sections.push(v.finish("vm", "vm.json")?);
    let bytes = sections.iter().map(|s| s.bytes).sum();
    let manifest =
        Manifest { format: FORMAT.into(), version: VERSION, writer: env!("CARGO_PKG_VERSION").into(), sections };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| err(e.to_string()))?;
    let mut m = Out::create(&tmp.join("manifest.json"))?;
    m.put(&text)?;
    m.finish("manifest", "manifest.json")?;
    std::fs::File::open(tmp).and_then(|d| d.sync_all()).map_err(|e| err(format!("syncing {}: {e}", tmp.display())))?;
    Ok(bytes)
}

/// A manifest read from its text and checked: the format, the version, every section
/// known, listed once, with a plain file name; `vm`, `ram` and `devmem` present.
pub fn parse_manifest(text: &[u8], dir: &Path) -> Result<Manifest> {
    let mpath = dir.join("manifest.json");
    let manifest: Manifest =
        serde_json::from_slice(text).map_err(|e| err(format!("{}: not a snapshot manifest: {e}", mpath.display())))?;
    if manifest.format != FORMAT {
        return Err(err(format!("{}: format '{}', not '{FORMAT}'", mpath.display(), manifest.format)));
    }
    if manifest.version != VERSION {
        return Err(err(format!(
            "{}: a snapshot of format version {} (written by passthru {}); this passthru reads version {VERSION} only",
            dir.display(),
            manifest.version,
            manifest.writer
        )));
    }
    for (i, s) in manifest.sections.iter().enumerate() {
        if !SECTIONS.contains(&s.name.as_str()) {
            return Err(err(format!("the manifest lists an unknown section '{}'", s.name)));
        }
        if manifest.sections[..i].iter().any(|o| o.name == s.name) {
            return Err(err(format!("the manifest lists section '{}' twice", s.name)));
        }
        if s.file.contains('/') || s.file.starts_with('.') || s.file.is_empty() {
            return Err(err(format!("section {}: file name '{}' is not allowed", s.name, s.file)));
        }
    }
    for need in ["vm", "ram", "devmem"] {
        if !manifest.sections.iter().any(|s| s.name == need) {
            return Err(err(format!("the manifest has no '{need}' section")));
        }
    }
    Ok(manifest)
}

/// Opens a snapshot directory: its manifest checked, every section's file opened
/// once (a regular file, its size the manifest's).
pub fn open_dir(dir: &Path) -> Result<(Manifest, Vec<(SectionFile, std::fs::File)>)> {
    let mpath = dir.join("manifest.json");
    let mut text = Vec::new();
    open_regular(&mpath)
        .map_err(|e| err(format!("{e} (not a passthru snapshot directory?)")))?
        .take(MAX_MANIFEST)
        .read_to_end(&mut text)
        .map_err(|e| err(format!("{}: {e}", mpath.display())))?;
    let manifest = parse_manifest(&text, dir)?;
    let mut files = Vec::new();
    for s in &manifest.sections {
        let f = open_regular(&dir.join(&s.file))?;
        let size = f.metadata().map_err(|e| err(format!("{}: {e}", s.file)))?.len();
        if size != s.bytes {
            return Err(err(format!("{}: {size} bytes, the manifest says {} (truncated or altered)", s.file, s.bytes)));
        }
        files.push((s.clone(), f));
    }
    Ok((manifest, files))
}

/// A whole section read and checksummed (at most `max` bytes).
pub fn read_whole(file: &std::fs::File, section: &SectionFile, max: u64) -> Result<Vec<u8>> {
    if section.bytes > max {
        return Err(err(format!("{} is too large", section.file)));
    }
    let mut out = Vec::new();
    let mut r = Checked::new(file, section);
    r.pass(
        section.bytes,
        Some(&mut |_, b| {
            out.extend_from_slice(b);
            Ok(())
        }),
    )?;
    r.finish()?;
    Ok(out)
}

/// Opens `path` for reading only if it is a regular file, not through a symlink, and
/// without blocking (a FIFO put in its place would block `open` forever).
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => err(format!("{}: a symbolic link; a snapshot holds only files", path.display())),
                _ => err(format!("{}: {e}", path.display())),
            },
        )?;
    let meta = f.metadata().map_err(|e| err(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(err(format!("{}: not a regular file", path.display())));
    }
    Ok(f)
}

/// Where bytes read from a section go: `(offset in the piece being passed, bytes)`.
pub type Sink<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<()>;
/// Where a record's bytes go: `(the record's address, offset in it, bytes)`.
pub type RecordSink<'a> = &'a mut dyn FnMut(u64, u64, &[u8]) -> Result<()>;

/// Reads a section's file front to back through a bounded buffer, checksumming every
/// byte: what is parsed and applied is exactly what was checked.
pub struct Checked<'a> {
    file: &'a std::fs::File,
    section: &'a SectionFile,
    buf: Vec<u8>,
    /// Unread bytes of `buf`: `buf[at..len]`.
    at: usize,
    len: usize,
    pos: u64,
    crc: u32,
}

impl<'a> Checked<'a> {
    /// A reader of `file`, the file of `section`, from its start.
    pub fn new(file: &'a std::fs::File, section: &'a SectionFile) -> Checked<'a> {
        Checked { file, section, buf: vec![0; 1 << 20], at: 0, len: 0, pos: 0, crc: 0 }
    }

    /// Bytes not read yet.
    pub fn left(&self) -> u64 {
        self.section.bytes - self.pos
    }

    /// The next bytes, at most `max` of them (empty only at the end).
    pub fn next(&mut self, max: usize) -> Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        if self.at == self.len {
            let want = (self.left().min(self.buf.len() as u64)) as usize;
            let n = self
                .file
                .read_at(&mut self.buf[..want], self.pos)
                .map_err(|e| err(format!("{}: {e}", self.section.file)))?;
            if n == 0 && want > 0 {
                return Err(err(format!(
                    "{}: shorter than the manifest says (truncated or altered)",
                    self.section.file
                )));
            }
            self.crc = crc32c::crc32c_append(self.crc, &self.buf[..n]);
            (self.at, self.len) = (0, n);
        }
        let n = max.min(self.len - self.at);
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        self.pos += n as u64;
        Ok(out)
    }

    /// Exactly `out.len()` bytes.
    pub fn read_exact(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let b = self.next(out.len() - done)?;
            if b.is_empty() {
                return Err(err(format!("{}: a record is cut", self.section.file)));
            }
            out[done..done + b.len()].copy_from_slice(b);
            done += b.len();
        }
        Ok(())
    }

    /// Passes the next `len` bytes to `sink` in pieces (None: read and checksum only).
    pub fn pass(&mut self, len: u64, mut sink: Option<Sink<'_>>) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let b = self.next((len - done).min(CHUNK as u64) as usize)?;
            if b.is_empty() {
                return Err(err(format!("{}: a record runs past the end", self.section.file)));
            }
            let n = b.len() as u64;
            if let Some(f) = sink.as_deref_mut() {
                f(done, b)?;
            }
            done += n;
        }
        Ok(())
    }

    /// The whole file was read and its checksum is the manifest's.
    pub fn finish(mut self) -> Result<()> {
        if self.left() != 0 || !self.next(1)?.is_empty() {
            return Err(err(format!("{}: longer than the manifest says (altered)", self.section.file)));
        }
        let size = self.file.metadata().map_err(|e| err(e.to_string()))?.len();
        if size != self.section.bytes {
            return Err(err(format!(
                "{}: {size} bytes, the manifest says {} (truncated or altered)",
                self.section.file, self.section.bytes
            )));
        }
        if self.crc != self.section.crc32c {
            return Err(err(format!(
                "{}: checksum {:#010x}, the manifest says {:#010x} (corrupted)",
                self.section.file, self.crc, self.section.crc32c
            )));
        }
        Ok(())
    }
}

/// Walks a data section's records (`address, length, bytes`), all checksummed:
/// `record(address, len)` checks each header, then `data(address, offset, bytes)` gets
/// its bytes in pieces (None: checked only). A record of no bytes is refused.
pub fn walk_records(
    file: &std::fs::File,
    section: &SectionFile,
    mut record: impl FnMut(u64, u64) -> Result<()>,
    mut data: Option<RecordSink<'_>>,
) -> Result<()> {
    let mut r = Checked::new(file, section);
    let parsed = (|| {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| err(format!("{}: too short", section.file)))?;
        if &magic != DATA_MAGIC {
            return Err(err(format!("{}: bad magic", section.file)));
        }
        while r.left() > 0 {
            let mut h = [0u8; 16];
            r.read_exact(&mut h)?;
            let (a, l) = h.split_at(8);
            let addr = u64::from_le_bytes(a.try_into().map_err(|_| err("a record header"))?);
            let len = u64::from_le_bytes(l.try_into().map_err(|_| err("a record header"))?);
            if len == 0 || len > r.left() {
                return Err(err(format!(
                    "{}: a record of {len} bytes at {addr:#x} (empty or past the end)",
                    section.file
                )));
            }
            record(addr, len)?;
            match data.as_deref_mut() {
                Some(d) => r.pass(len, Some(&mut |off, b| d(addr, off, b)))?,
                None => r.pass(len, None)?,
            }
        }
        Ok(())
    })();
    match parsed {
        Ok(()) => r.finish(),
        // A file that does not parse is most often a corrupted one: say so if it is.
        Err(e) => {
            let left = r.left();
            r.pass(left, None).and_then(|()| r.finish()).and(Err(e))
        }
    }
}
