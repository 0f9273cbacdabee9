//! One end of a vfio-user connection: whole messages with their fds, request/reply
//! matching by message id, and a reader loop that routes replies to the requests
//! waiting for them and hands the peer's requests to a handler.
//!
//! Every wait on the peer is bounded by the endpoint's timeout:
//! - sending never blocks while holding a lock: a message goes out with a
//!   non-blocking `sendmsg`; what the socket does not take joins a bounded backlog that
//!   a writer thread (started only when needed) drains in order. A sender waits only
//!   when the backlog is full, and at most the timeout;
//! - a request waits at most the timeout for its reply;
//! - a peer that takes no bytes, or answers nothing, within the timeout is declared
//!   dead: the connection is shut down once, the reader loop ends (so the owner's
//!   death handling runs) and every later send or request fails at once.

use crate::proto::{self, Command, FLAG_ERROR, FLAG_REPLY, HEADER_SIZE, Header, ProtoError};
use crate::sys;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How long a peer may take to accept a message or answer a request before it is
/// declared dead, unless the endpoint was built with another timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of messages queued beyond what the socket took before senders wait (a peer
/// that reads slowly applies back-pressure, as a full posted-write buffer does).
pub const BACKLOG_BYTES: usize = 4 << 20;

/// What can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the connection (or it was shut down).
    #[error("the vfio-user connection is closed")]
    Closed,
    /// A socket error.
    #[error("vfio-user socket: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something malformed.
    #[error("vfio-user protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The peer answered with an error.
    #[error("the peer failed {command}: {}", io::Error::from_raw_os_error(*errno))]
    Remote {
        /// The request.
        command: Command,
        /// Its errno.
        errno: i32,
    },
    /// No reply in time: the peer is declared dead.
    #[error("no reply to {0} within {1:?}")]
    Timeout(Command, Duration),
    /// The peer was declared dead earlier (it stopped reading or answering).
    #[error("the peer stopped responding: {0}")]
    Unresponsive(String),
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
    /// File descriptors that came with it (close-on-exec).
    pub fds: Vec<File>,
}

type Pending = HashMap<u16, SyncSender<Result<Message, Error>>>;

/// A message the socket has not taken whole yet.
struct Queued {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

#[derive(Default)]
struct Out {
    backlog: VecDeque<Queued>,
    bytes: usize,
    writer_running: bool,
}

/// One end of a connection.
pub struct Endpoint {
    stream: UnixStream,
    timeout: Duration,
    out: Mutex<Out>,
    /// Signalled when the backlog shrinks or the endpoint dies.
    drained: Condvar,
    pending: Mutex<Pending>,
    next_id: AtomicU16,
    closed: AtomicBool,
    death: Mutex<Option<String>>,
    this: Weak<Endpoint>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("closed", &self.is_closed()).finish()
    }
}

impl Endpoint {
    /// An endpoint over a connected stream, with [`DEFAULT_TIMEOUT`].
    pub fn new(stream: UnixStream) -> Arc<Endpoint> {
        Endpoint::with_timeout(stream, DEFAULT_TIMEOUT)
    }

    /// An endpoint whose peer must accept each message and answer each request within
    /// `timeout`.
    pub fn with_timeout(stream: UnixStream, timeout: Duration) -> Arc<Endpoint> {
        Arc::new_cyclic(|this| Endpoint {
            stream,
            timeout,
            out: Mutex::new(Out::default()),
            drained: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU16::new(1),
            closed: AtomicBool::new(false),
            death: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// The peer's deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Why the peer was declared dead, if it was.
    pub fn death(&self) -> Option<String> {
        self.death.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes the connection: the reader loop ends, waiting requests fail.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _g = self.lock_out();
        self.drained.notify_all();
    }

    /// Declares the peer dead (once): records why and shuts the connection down.
    pub fn declare_dead(&self, why: &str) {
        {
            let mut d = self.death.lock().unwrap_or_else(|e| e.into_inner());
            if d.is_none() && !self.is_closed() {
                tracing::warn!("vfio-user: peer declared dead: {why}");
                *d = Some(why.to_string());
            }
        }
        self.shutdown();
    }

    fn lock_out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> Error {
        match self.death() {
            Some(why) => Error::Unresponsive(why),
            None => Error::Closed,
        }
    }

    /// Sends one whole message (fds ride on its first byte). Never blocks on the
    /// socket; waits (at most the timeout) only while the backlog is full.
    pub fn send(&self, header: Header, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        if fds.len() > proto::MAX_FDS {
            return Err(Error::Proto(ProtoError::BadSize("too many fds for one message")));
        }
        let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
        bytes.extend_from_slice(&header.to_bytes());
        bytes.extend_from_slice(payload);
        self.send_bytes(bytes, fds)
    }

    fn send_bytes(&self, bytes: Vec<u8>, fds: &[RawFd]) -> Result<(), Error> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let mut out = self.lock_out();
        if out.backlog.is_empty() {
            match sys::send_nonblocking(&self.stream, &bytes, fds) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    // Part of it went (with its fds): queue the rest.
                    out.bytes += bytes.len() - n;
                    out.backlog.push_back(Queued { bytes, sent: n, fds: Vec::new() });
                    return self.start_writer(out);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    drop(out);
                    self.declare_dead(&format!("send failed: {e}"));
                    return Err(Error::Io(e));
                }
            }
        } else {
            let deadline = Instant::now() + self.timeout;
            while out.bytes + bytes.len() > BACKLOG_BYTES && !out.backlog.is_empty() && !self.is_closed() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(out);
                    let why = format!("it took no bytes for {:?} with {BACKLOG_BYTES} bytes queued", self.timeout);
                    self.declare_dead(&why);
                    return Err(Error::Unresponsive(why));
                }
                out = self.drained.wait_timeout(out, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            if self.is_closed() {
                return Err(self.closed_error());
            }
        }
        // Queued whole: its fds must outlive the caller's copies.
        let owned = fds.iter().map(|fd| sys::dup_cloexec(*fd)).collect::<io::Result<Vec<OwnedFd>>>()?;
        out.bytes += bytes.len();
        out.backlog.push_back(Queued { bytes, sent: 0, fds: owned });
        self.start_writer(out)
    }

    /// Makes sure a writer thread drains the backlog.
    fn start_writer(&self, mut out: MutexGuard<'_, Out>) -> Result<(), Error> {
        if out.writer_running {
            return Ok(());
        }
        let Some(me) = self.this.upgrade() else { return Err(Error::Closed) };
        out.writer_running = true;
        drop(out);
        let spawned = std::thread::Builder::new().name("vfu-writer".into()).spawn(move || me.drain_backlog());
        if let Err(e) = spawned {
            self.lock_out().writer_running = false;
            self.declare_dead(&format!("cannot start a writer thread: {e}"));
            return Err(Error::Io(e));
        }
        Ok(())
    }

    /// The writer thread: sends the backlog in order; declares the peer dead if the
    /// socket takes nothing for the timeout.
    fn drain_backlog(&self) {
        loop {
            let mut out = self.lock_out();
            if self.is_closed() || out.backlog.is_empty() {
                out.writer_running = false;
                out.backlog.clear();
                out.bytes = 0;
                self.drained.notify_all();
                return;
            }
            let r = {
                let Some(head) = out.backlog.front() else { continue };
                let raw: Vec<RawFd> = head.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                sys::send_nonblocking(&self.stream, &head.bytes[head.sent..], &raw)
            };
            match r {
                Ok(n) => {
                    let done = out.backlog.front_mut().is_some_and(|head| {
                        head.sent += n;
                        head.fds.clear(); // they rode on the first byte taken
                        head.sent == head.bytes.len()
                    });
                    out.bytes = out.bytes.saturating_sub(n);
                    if done {
                        out.backlog.pop_front();
                    }
                    self.drained.notify_all();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(out);
                    if !sys::wait_writable(&self.stream, self.timeout) {
                        self.declare_dead(&format!("it took no bytes for {:?}", self.timeout));
                    }
                }
                Err(e) => {
                    drop(out);
                    self.declare_dead(&format!("send failed: {e}"));
                }
            }
        }
    }

    /// Writes raw bytes to the socket, bypassing framing (robustness tests inject
    /// malformed messages with it).
    pub fn send_bytes_for_tests(&self, bytes: &[u8]) {
        let _ = self.send_bytes(bytes.to_vec(), &[]);
    }

    /// Receives one whole message. A malformed header is an error (the stream cannot
    /// be resynchronised after it: the caller closes the connection).
    pub fn receive(&self) -> Result<Message, Error> {
        let mut hdr = [0u8; HEADER_SIZE];
        let (n, fds) = sys::recv_with_fds(&self.stream, &mut hdr)?;
        let fds: Vec<File> = fds.into_iter().map(File::from).collect();
        if n == 0 {
            return Err(Error::Closed);
        }
        if n < HEADER_SIZE {
            (&self.stream).read_exact(&mut hdr[n..]).map_err(|_| Error::Closed)?;
        }
        let header = Header::from_bytes(&hdr)?;
        let mut payload = vec![0u8; header.payload_len()];
        (&self.stream).read_exact(&mut payload).map_err(|_| Error::Closed)?;
        Ok(Message { header, payload, fds })
    }

    /// Sends a request and waits for its reply (an error reply becomes [`Error::Remote`]).
    pub fn request(&self, command: Command, payload: &[u8], fds: &[RawFd]) -> Result<Message, Error> {
        self.request_with_timeout(command, payload, fds, self.timeout)
    }

    /// As [`Endpoint::request`] with its own deadline (a device reset may take longer).
    pub fn request_with_timeout(
        &self,
        command: Command,
        payload: &[u8],
        fds: &[RawFd],
        timeout: Duration,
    ) -> Result<Message, Error> {
        let (id, rx) = self.post_request(command as u16, payload, fds)?;
        self.wait_reply(id, command as u16, &rx, Instant::now() + timeout, timeout)
    }

    /// As [`Endpoint::request`] with any command number, defined or not (tools and
    /// robustness tests); an error reply to an undefined command is reported as
    /// `Remote { command: Version, .. }`.
    pub fn request_raw(&self, command: u16, payload: &[u8], fds: &[RawFd]) -> Result<Message, Error> {
        let (id, rx) = self.post_request(command, payload, fds)?;
        self.wait_reply(id, command, &rx, Instant::now() + self.timeout, self.timeout)
    }

    /// Sends several requests back to back, then waits for all the replies (one
    /// round trip for the batch, as the spec's command pipelining allows). Returns each
    /// request's outcome, in order (a request that could not be sent fails, and so do
    /// those after it).
    pub fn request_many(&self, requests: &[(Command, Vec<u8>, Vec<RawFd>)]) -> Vec<Result<Message, Error>> {
        let mut posted = Vec::with_capacity(requests.len());
        let mut send_failed = false;
        for (c, p, f) in requests {
            if send_failed {
                posted.push(Err(self.closed_error()));
                continue;
            }
            match self.post_request(*c as u16, p, f) {
                Ok(x) => posted.push(Ok((*c, x))),
                Err(e) => {
                    send_failed = true;
                    posted.push(Err(e));
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        posted
            .into_iter()
            .map(|p| {
                let (c, (id, rx)) = p?;
                self.wait_reply(id, c as u16, &rx, deadline, self.timeout)
            })
            .collect()
    }

    fn post_request(
        &self,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(u16, std::sync::mpsc::Receiver<Result<Message, Error>>), Error> {
        let size = u32::try_from(HEADER_SIZE + payload.len())
            .map_err(|_| Error::Proto(ProtoError::BadSize("message too large")))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let header = Header { id, command, size, flags: 0, error: 0 };
        if let Err(e) = self.send(header, payload, fds) {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    fn wait_reply(
        &self,
        id: u16,
        command: u16,
        rx: &std::sync::mpsc::Receiver<Result<Message, Error>>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let cmd = Command::from_u16(command).unwrap_or(Command::Version);
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = match rx.recv_timeout(left) {
            Ok(r) => r?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                self.declare_dead(&format!("no reply to {cmd} within {timeout:?}"));
                return Err(Error::Timeout(cmd, timeout));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(self.closed_error()),
        };
        if reply.header.flags & FLAG_ERROR != 0 {
            let errno = i32::try_from(reply.header.error).unwrap_or(libc::EIO);
            return Err(Error::Remote { command: cmd, errno });
        }
        Ok(reply)
    }

    /// Replies to `request` with `payload`.
    pub fn reply(&self, request: &Header, payload: &[u8]) -> Result<(), Error> {
        self.reply_with_fds(request, payload, &[])
    }

    /// Replies to `request` with `payload` and descriptors.
    pub fn reply_with_fds(&self, request: &Header, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let size = u32::try_from(HEADER_SIZE + payload.len())
            .map_err(|_| Error::Proto(ProtoError::BadSize("reply too large")))?;
        self.send(Header { id: request.id, command: request.command, size, flags: FLAG_REPLY, error: 0 }, payload, fds)
    }

    /// Replies to `request` with an error.
    pub fn reply_error(&self, request: &Header, errno: i32) -> Result<(), Error> {
        let header = Header {
            id: request.id,
            command: request.command,
            size: HEADER_SIZE as u32,
            flags: FLAG_REPLY | FLAG_ERROR,
            error: u32::try_from(errno).unwrap_or(libc::EIO as u32),
        };
        self.send(header, &[], &[])
    }

    /// Reads messages until the connection ends: replies go to the requests waiting for
    /// them, requests to `on_request`. Returns why it ended; afterwards every waiting
    /// and future request fails.
    pub fn run(&self, mut on_request: impl FnMut(Message)) -> Error {
        let why = loop {
            match self.receive() {
                Ok(m) if m.header.is_reply() => {
                    let tx = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.header.id);
                    match tx {
                        Some(tx) => {
                            let _ = tx.send(Ok(m));
                        }
                        None => tracing::debug!("vfio-user: reply {} to no waiting request; dropped", m.header.id),
                    }
                }
                Ok(m) => on_request(m),
                Err(e) => break e,
            }
        };
        self.shutdown();
        let waiting: Vec<_> = self.pending.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(self.closed_error()));
        }
        match (self.death(), why) {
            (Some(d), _) => Error::Unresponsive(d),
            (None, why) => why,
        }
    }
}

/// Replies to a request that could not be decoded (the connection goes on: the header
/// framed the message, only its payload was bad).
pub fn refuse(ep: &Endpoint, header: &Header, err: &proto::ProtoError) {
    tracing::warn!("vfio-user: refusing command {}: {err}", header.command);
    if header.flags & proto::FLAG_NO_REPLY == 0 {
        let _ = ep.reply_error(header, err.errno());
    }
}
