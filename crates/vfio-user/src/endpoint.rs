//! One end of a vfio-user connection: whole messages with their fds, request/reply
//! matching by message id, and a reader loop that routes replies to the requests
//! waiting for them and hands the peer's requests to a handler.

use crate::proto::{self, Command, FLAG_ERROR, FLAG_REPLY, HEADER_SIZE, Header, MAX_FDS, ProtoError};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long a request waits for its reply before giving up on the peer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// No reply in time.
    #[error("no reply to {0} within {1:?}")]
    Timeout(Command, Duration),
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
    /// File descriptors that came with it.
    pub fds: Vec<File>,
}

type Pending = HashMap<u16, SyncSender<Result<Message, Error>>>;

/// One end of a connection.
pub struct Endpoint {
    stream: UnixStream,
    write_lock: Mutex<()>,
    pending: Mutex<Pending>,
    next_id: AtomicU16,
    closed: AtomicBool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("closed", &self.is_closed()).finish()
    }
}

impl Endpoint {
    /// An endpoint over a connected stream.
    pub fn new(stream: UnixStream) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            stream,
            write_lock: Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU16::new(1),
            closed: AtomicBool::new(false),
        })
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection: the reader loop ends, waiting requests fail.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends one whole message (fds ride on its first byte).
    pub fn send(&self, header: Header, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if fds.len() > MAX_FDS {
            return Err(Error::Proto(ProtoError::BadSize("too many fds for one message")));
        }
        let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
        buf.extend_from_slice(&header.to_bytes());
        buf.extend_from_slice(payload);
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let sent = self.stream.send_with_fds(&[&buf[..]], fds).map_err(|e| Error::Io(io::Error::from(e)))?;
        if sent < buf.len() {
            (&self.stream).write_all(&buf[sent..])?;
        }
        Ok(())
    }

    /// Writes raw bytes to the socket, bypassing framing (robustness tests inject
    /// malformed messages with it).
    pub fn send_bytes_for_tests(&self, bytes: &[u8]) {
        let _g = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = (&self.stream).write_all(bytes);
    }

    /// Receives one whole message. A malformed header is an error (the stream cannot
    /// be resynchronised after it: the caller closes the connection).
    pub fn receive(&self) -> Result<Message, Error> {
        let mut hdr = [0u8; HEADER_SIZE];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HEADER_SIZE }];
        // SAFETY: the iovec points into `hdr`, valid for HEADER_SIZE bytes for the call;
        // `raw_fds` has room for MAX_FDS descriptors.
        let (n, nfds) =
            unsafe { self.stream.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(|e| Error::Io(io::Error::from(e)))?;
        // SAFETY: the kernel installed `nfds` new descriptors that nobody else owns.
        let fds: Vec<File> = raw_fds[..nfds].iter().map(|fd| unsafe { File::from_raw_fd(*fd) }).collect();
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
        self.request_raw(command as u16, payload, fds).map_err(|e| match e {
            Error::Remote { errno, .. } => Error::Remote { command, errno },
            other => other,
        })
    }

    /// As [`Endpoint::request`] with any command number, defined or not (tools and
    /// robustness tests); an error reply to an undefined command is reported as
    /// `Remote { command: Version, .. }`.
    pub fn request_raw(&self, command: u16, payload: &[u8], fds: &[RawFd]) -> Result<Message, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let size = u32::try_from(HEADER_SIZE + payload.len())
            .map_err(|_| Error::Proto(ProtoError::BadSize("message too large")))?;
        let header = Header { id, command, size, flags: 0, error: 0 };
        let cmd = Command::from_u16(command).unwrap_or(Command::Version);
        if let Err(e) = self.send(header, payload, fds) {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(e);
        }
        let reply = match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                return Err(Error::Timeout(cmd, REPLY_TIMEOUT));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Closed),
        };
        if reply.header.flags & FLAG_ERROR != 0 {
            let errno = i32::try_from(reply.header.error).unwrap_or(libc::EIO);
            return Err(Error::Remote { command: cmd, errno });
        }
        Ok(reply)
    }

    /// Replies to `request` with `payload`.
    pub fn reply(&self, request: &Header, payload: &[u8]) -> Result<(), Error> {
        let size = u32::try_from(HEADER_SIZE + payload.len())
            .map_err(|_| Error::Proto(ProtoError::BadSize("reply too large")))?;
        self.send(Header { id: request.id, command: request.command, size, flags: FLAG_REPLY, error: 0 }, payload, &[])
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
    /// and future request fails with [`Error::Closed`].
    pub fn run(&self, mut on_request: impl FnMut(Message)) -> Error {
        let why = loop {
            match self.receive() {
                Ok(m) if m.header.is_reply() => {
                    let tx = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.header.id);
                    match tx {
                        Some(tx) => {
                            let _ = tx.send(Ok(m));
                        }
                        None => tracing::warn!("vfio-user: reply {} to no request; dropped", m.header.id),
                    }
                }
                Ok(m) => on_request(m),
                Err(e) => break e,
            }
        };
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let waiting: Vec<_> = self.pending.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(Error::Closed));
        }
        why
    }
}

/// Replies to a request that could not be decoded, then says whether the connection can
/// go on (it can: the header framed the message, only its payload was bad).
pub fn refuse(ep: &Endpoint, header: &Header, err: &proto::ProtoError) {
    tracing::warn!("vfio-user: refusing command {}: {err}", header.command);
    let _ = ep.reply_error(header, err.errno());
}
