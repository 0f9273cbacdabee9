//! The API server: a Unix socket created with mode 0600 before it accepts anyone, an
//! accept thread (`api`), and one thread per client (`api-client`, at most
//! [`MAX_CLIENTS`]). Every wait on a client has a deadline: a request must arrive whole
//! within [`REQUEST_DEADLINE`] of its first byte, a connection with no request in
//! progress (just connected, or between keep-alive requests) is closed after
//! [`IDLE_DEADLINE`], an answer must be taken within [`WRITE_DEADLINE`]. Idle
//! connections hold no slot against a client with a request: when all slots are
//! taken, an idle one is closed for the newcomer; only when every client is in the
//! middle of a request is a newcomer answered 503. A request is carried out only once it is complete: a
//! client that leaves mid-request changes nothing. Dropping the [`Server`] stops it,
//! joins every thread and removes the socket file.

use crate::command::decode;
use crate::http::{Parsed, parse_request, response};
use crate::{ApiError, Command};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// A request must be complete this long after its first byte arrived.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A connection with no request in progress (no byte of one yet) is closed after this
/// long: as tight as an active request's deadline.
pub const IDLE_DEADLINE: Duration = REQUEST_DEADLINE;
/// A client must take an answer within this long.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// A stopping server waits this long for requests being carried out (a snapshot being
/// written) to finish and be answered; a second signal stops the process sooner.
pub const STOP_GRACE: Duration = Duration::from_secs(120);
/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// What carries out commands: the VMM.
pub trait Handler: Send + Sync {
    /// Carries out one command: a JSON answer, or an error answer (nothing changed).
    fn handle(&self, command: Command) -> Result<serde_json::Value, ApiError>;

    /// As [`Handler::handle`], with files to hand to the client along with the answer
    /// (passed with SCM_RIGHTS on the connection; a client that does not take them,
    /// e.g. curl, has them closed by the kernel).
    fn handle_with_files(&self, command: Command) -> Result<(serde_json::Value, Vec<std::fs::File>), ApiError> {
        self.handle(command).map(|v| (v, Vec::new()))
    }

    /// `GET events`: a subscription to the VM's events, one JSON line each; the
    /// stream ends when the sender is dropped (the VM ended).
    fn events(&self) -> Result<std::sync::mpsc::Receiver<String>, ApiError> {
        Err(ApiError::not_found("this server has no event stream"))
    }
}

/// Counters of the server itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests answered (any status).
    pub requests: u64,
    /// Of which with an error status.
    pub errors: u64,
    /// Connections refused because [`MAX_CLIENTS`] were being served.
    pub refused: u64,
    /// Connections closed by a deadline.
    pub timed_out: u64,
    /// Idle connections closed to make room for a new client.
    pub evicted: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    evicted: AtomicU64,
}

/// A connected client: a handle to shut its connection down, its thread, and whether
/// it has a request in progress (the rest of the time it is idle).
struct Client {
    stream: UnixStream,
    thread: JoinHandle<()>,
    busy: Arc<AtomicBool>,
}

struct Shared {
    stop: AtomicBool,
    handler: Arc<dyn Handler>,
    /// Connected clients: a handle to shut each one down on stop, and its thread
    /// (joined by `reap` once it has ended, or by `drop`).
    clients: Mutex<HashMap<u64, Client>>,
    counters: Counters,
    /// Requests being carried out by the handler or answered right now.
    handling: AtomicU64,
}

/// A running API server.
pub struct Server {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    wake: OwnedFd,
    path: PathBuf,
}

impl Server {
    /// Listens at `path` (mode 0600 from the start) and serves `handler`. A stale
    /// socket file (nobody listening) is replaced; a live one or another file is an
    /// error naming the fix.
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<Server, String> {
        let listener = listen_private(path)?;
        listener.set_nonblocking(true).map_err(|e| format!("API socket: {e}"))?;
        // SAFETY: eventfd with valid flags; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(format!("API socket: eventfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor this function owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            handler,
            clients: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            handling: AtomicU64::new(0),
        });
        let (s, wake_fd) = (Arc::clone(&shared), wake.as_raw_fd());
        let accept = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&s, &listener, wake_fd))
            .map_err(|e| format!("API socket: cannot start its thread: {e}"))?;
        Ok(Server { shared, accept: Some(accept), wake, path: path.to_path_buf() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server's own counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        ServerStats {
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this server owns.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let clients: Vec<_> = self.shared.clients.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        // Every client thread sees the stop flag within a tick (an event stream ends
        // properly then); a request being carried out finishes and is answered first
        // (up to STOP_GRACE). Then whatever is left is shut down.
        let started = Instant::now();
        let mut said = false;
        while clients.iter().any(|(_, c)| !c.thread.is_finished()) {
            let handling = self.shared.handling.load(Ordering::Acquire);
            let waited = started.elapsed();
            if waited >= STOP_GRACE || (handling == 0 && waited >= 3 * TICK) {
                break;
            }
            if handling > 0 && waited >= Duration::from_secs(1) && !said {
                said = true;
                tracing::info!(requests = handling, "API: waiting for requests under way to finish");
            }
            std::thread::sleep(TICK / 10);
        }
        for (_, c) in clients {
            if !c.thread.is_finished() {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
            let _ = c.thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the listening socket: socket, bind (under a temporary name in the same
/// directory), chmod 0600, listen, then renamed to `path`: nobody can connect before
/// the mode is set, and a client that sees the file can connect.
fn listen_private(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::ffi::OsStrExt;
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("--api-socket {shown}: a file that is not a socket is there; pick another path"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("--api-socket {shown}: another process serves it; stop it or pick another path"));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("--api-socket {shown}: cannot replace the stale socket: {e}"))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Bound in place when the temporary name would not fit a socket address.
    let bound_at: &Path = if tmp.as_os_str().len() < addr.sun_path.len() { &tmp } else { path };
    let _ = std::fs::remove_file(&tmp);
    let bytes = bound_at.as_os_str().as_bytes();
    if path.as_os_str().len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(format!("--api-socket {shown}: a socket path must be shorter than {} bytes", addr.sun_path.len()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("--api-socket {shown}: socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned from here on.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::bind(owned.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(format!("--api-socket {shown}: bind: {}", std::io::Error::last_os_error()));
    }
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(bound_at, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(bound_at);
        return Err(format!("--api-socket {shown}: chmod 0600: {e}"));
    }
    // SAFETY: listen on the socket bound above.
    if unsafe { libc::listen(owned.as_raw_fd(), 64) } != 0 {
        let _ = std::fs::remove_file(bound_at);
        return Err(format!("--api-socket {shown}: listen: {}", std::io::Error::last_os_error()));
    }
    if bound_at != path
        && let Err(e) = std::fs::rename(bound_at, path)
    {
        let _ = std::fs::remove_file(bound_at);
        return Err(format!("--api-socket {shown}: {e}"));
    }
    Ok(UnixListener::from(owned))
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, wake: i32) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of 2 pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK.as_millis() as i32) };
        if n <= 0 || fds[1].revents != 0 {
            reap(shared);
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            // Out of descriptors, say: the listener stays readable; do not spin.
            std::thread::sleep(TICK);
            continue;
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        reap(shared);
        let mut clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS {
            // An idle connection gives its slot up; clients in the middle of a request
            // keep theirs.
            let idle = clients.iter().find(|(_, c)| !c.busy.load(Ordering::Acquire)).map(|(k, _)| *k);
            match idle.and_then(|k| clients.remove(&k)) {
                Some(c) => {
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                    let _ = c.thread.join(); // it sees the shutdown within a tick
                    shared.counters.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    drop(clients);
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let e = ApiError {
                        status: 503,
                        message: format!("{MAX_CLIENTS} clients are in the middle of requests; retry"),
                    };
                    let _ = stream.set_write_timeout(Some(TICK));
                    let _ = (&stream).write_all(&response(e.status, &e.body(), true));
                    continue;
                }
            }
        }
        let Ok(handle) = stream.try_clone() else { continue };
        next_id += 1;
        let (id, s) = (next_id, Arc::clone(shared));
        let busy = Arc::new(AtomicBool::new(false));
        let b = Arc::clone(&busy);
        // The entry (and the thread) is reaped once the thread has ended.
        let thread = std::thread::Builder::new().name("api-client".into()).spawn(move || serve_client(&s, stream, &b));
        match thread {
            Ok(thread) => {
                clients.insert(id, Client { stream: handle, thread, busy });
            }
            Err(e) => tracing::warn!("API: cannot start a client thread: {e}"),
        }
    }
}

/// Joins and forgets the clients whose thread has ended.
fn reap(shared: &Shared) {
    let mut clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
    let done: Vec<u64> = clients.iter().filter(|(_, c)| c.thread.is_finished()).map(|(k, _)| *k).collect();
    for id in done {
        if let Some(c) = clients.remove(&id) {
            let _ = c.thread.join();
        }
    }
}

/// Counts a request as being carried out while it lives (a panic in the handler too).
struct Handling<'a>(&'a AtomicU64);

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_client(shared: &Shared, mut stream: UnixStream, busy: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(TICK));
    let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
    let mut buf: Vec<u8> = Vec::new();
    let (mut started, mut idle_since, mut sent_continue) = (None::<Instant>, Instant::now(), false);
    let mut chunk = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        match parse_request(&buf) {
            Err(e) => {
                answer(shared, &mut stream, e.status, &e.body(), true);
                return;
            }
            Ok(Parsed::Complete(req, used)) => {
                buf.drain(..used);
                if let Ok(Command::Events) = decode(&req.method, &req.path, &req.body) {
                    stream_events(shared, &mut stream);
                    return;
                }
                let t0 = Instant::now();
                shared.handling.fetch_add(1, Ordering::AcqRel);
                let _handling = Handling(&shared.handling);
                let span = tracing::debug_span!("api", method = %req.method, path = %req.path).entered();
                let result =
                    decode(&req.method, &req.path, &req.body).and_then(|c| shared.handler.handle_with_files(c));
                let (status, body, files) = match result {
                    Ok((v, files)) => (200, v.to_string(), files),
                    Err(e) => (e.status, e.body(), Vec::new()),
                };
                tracing::debug!(status, us = t0.elapsed().as_micros() as u64, "request");
                drop(span);
                if !answer_with(shared, &mut stream, status, &body, !req.keep_alive, &files) || !req.keep_alive {
                    return;
                }
                drop(_handling);
                started = (!buf.is_empty()).then(Instant::now);
                busy.store(started.is_some(), Ordering::Release);
                idle_since = Instant::now();
                sent_continue = false;
                continue;
            }
            Ok(Parsed::Incomplete { expect_continue }) => {
                if expect_continue && !sent_continue {
                    if stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                        return;
                    }
                    sent_continue = true;
                }
            }
        }
        if started.is_some_and(|t| t.elapsed() > REQUEST_DEADLINE) {
            shared.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            let e =
                ApiError { status: 408, message: format!("the request was not complete within {REQUEST_DEADLINE:?}") };
            answer(shared, &mut stream, e.status, &e.body(), true);
            return;
        }
        if started.is_none() && idle_since.elapsed() > IDLE_DEADLINE {
            shared.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match stream.read(&mut chunk) {
            // The client left: a partial request is dropped, nothing was done for it.
            Ok(0) => return,
            Ok(n) => {
                if started.is_none() {
                    started = Some(Instant::now());
                    busy.store(true, Ordering::Release);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}

/// Streams the VM's events to the client, chunked (one JSON line per chunk), until it
/// leaves, the server stops, or the VM ends. A client that does not take a chunk
/// within [`WRITE_DEADLINE`] is cut off (it cannot slow the VM: events it does not
/// take are dropped from its queue).
fn stream_events(shared: &Shared, stream: &mut UnixStream) {
    let rx = match shared.handler.events() {
        Ok(rx) => rx,
        Err(e) => {
            answer(shared, stream, e.status, &e.body(), true);
            return;
        }
    };
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\
                Connection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = |s: &mut UnixStream, line: &str| -> bool {
        let body = format!("{line}\n");
        s.write_all(format!("{:x}\r\n{body}\r\n", body.len()).as_bytes()).is_ok()
    };
    while !shared.stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(TICK) {
            Ok(line) => {
                if !chunk(stream, &line) {
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // A client that left is noticed here: a read returns 0.
                let mut b = [0u8; 64];
                let _ = stream.set_nonblocking(true);
                let gone = matches!(stream.read(&mut b), Ok(0));
                let _ = stream.set_nonblocking(false);
                if gone {
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // What was published before the end (the VM stopping) still goes out.
    while let Ok(line) = rx.try_recv() {
        if !chunk(stream, &line) {
            return;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
}

/// Writes one answer, all of it within [`WRITE_DEADLINE`] (a client reading slowly
/// cannot hold its slot); false if the client did not take it in time.
fn answer(shared: &Shared, stream: &mut UnixStream, status: u16, body: &str, close: bool) -> bool {
    answer_with(shared, stream, status, body, close, &[])
}

/// [`answer`], `files` passed with its first bytes.
fn answer_with(
    shared: &Shared,
    stream: &mut UnixStream,
    status: u16,
    body: &str,
    close: bool,
    files: &[std::fs::File],
) -> bool {
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    if status >= 400 {
        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    let bytes = response(status, body, close);
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut done = 0;
    let fds: Vec<std::os::fd::RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    while done < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            shared.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let sent = if done == 0 && !fds.is_empty() {
            use vmm_sys_util::sock_ctrl_msg::ScmSocket;
            stream.send_with_fds(&[&bytes[..]], &fds).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        } else {
            stream.write(&bytes[done..])
        };
        match sent {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
