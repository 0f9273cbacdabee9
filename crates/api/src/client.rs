//! The client `passthru ctl` and `passthru stat` use: one request per connection
//! (`Connection: close`), a deadline on every read and write, the answer's body parsed
//! as JSON. One request and one Content-Length answer need no HTTP client crate (hyper
//! would bring an async runtime); the answer's head is parsed by httparse.

use crate::PREFIX;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest answer accepted.
pub const MAX_ANSWER: usize = 64 << 20;

/// An answer: its status and its JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body as JSON (`null` when empty).
    pub body: serde_json::Value,
}

impl Answer {
    /// The error message of an error answer (`{"error": "..."}`), else the body.
    pub fn message(&self) -> String {
        match self.body.get("error").and_then(|e| e.as_str()) {
            Some(m) => m.to_string(),
            None => self.body.to_string(),
        }
    }
}

/// Sends `METHOD /api/v1/ENDPOINT` with `body` to the API socket at `socket`, waits at
/// most `timeout` for each read and write.
pub fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, String> {
    call_with_files(socket, method, endpoint, body, timeout).map(|(a, _)| a)
}

/// [`call`], also taking the files the server passed with its answer (SCM_RIGHTS).
pub fn call_with_files(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(Answer, Vec<std::fs::File>), String> {
    let shown = socket.display();
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!("cannot connect to the API socket {shown}: {e} (is passthru running with --api-socket?)")
    })?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("sending to {shown}: {e}"))?;
    // The first read takes the files passed with the answer's first bytes.
    let mut first = vec![0u8; 64 << 10];
    let (n, file) = recv_with_file(&s, &mut first).map_err(|e| format!("reading the answer from {shown}: {e}"))?;
    first.truncate(n);
    let mut raw = first;
    if n > 0 {
        (&mut s)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading the answer from {shown}: {e}"))?;
    }
    Ok((parse_answer(&raw)?, file.into_iter().collect()))
}

/// Follows `GET /api/v1/events`: calls `line` with each event (a JSON line) as it
/// comes, until the server ends the stream (the VM ended: Ok) or `line` returns
/// false. No deadline on waiting for events (a quiet VM sends none); a broken stream
/// is an error.
pub fn follow_events(socket: &Path, mut line: impl FnMut(&str) -> bool) -> Result<(), String> {
    use std::io::BufRead;
    let shown = socket.display();
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!("cannot connect to the API socket {shown}: {e} (is passthru running with --api-socket?)")
    })?;
    s.write_all(format!("GET {PREFIX}events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("sending to {shown}: {e}"))?;
    let mut r = std::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).map_err(|e| format!("reading from {shown}: {e}"))? == 0 {
            return Err(format!("{shown}: the server closed the connection before answering"));
        }
        if l == "\r\n" {
            break;
        }
        head.push_str(&l);
    }
    if !head.starts_with("HTTP/1.1 200") {
        let mut rest = Vec::new();
        let _ = r.take(MAX_ANSWER as u64).read_to_end(&mut rest);
        let mut raw = head.into_bytes();
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&rest);
        let a = parse_answer(&raw)?;
        return Err(format!("events: {} ({})", a.message(), a.status));
    }
    // Chunked: a size line, the chunk (one event and its newline), CRLF; size 0 ends.
    loop {
        let mut size = String::new();
        if r.read_line(&mut size).map_err(|e| format!("reading events: {e}"))? == 0 {
            return Err("the event stream was cut".into());
        }
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| "a malformed event stream".to_string())?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_ANSWER {
            return Err("an event over the answer limit".into());
        }
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk).map_err(|e| format!("reading events: {e}"))?;
        let text = String::from_utf8_lossy(&chunk[..n]);
        if !line(text.trim_end()) {
            return Ok(());
        }
    }
}

/// Parses a whole answer (head and Content-Length body).
pub fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    if raw.len() > MAX_ANSWER {
        return Err(format!("the answer is over {MAX_ANSWER} bytes"));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the server closed the connection before answering".into()),
        Err(e) => return Err(format!("malformed answer: {e}")),
    };
    let status = r.code.unwrap_or(0);
    let length = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    let rest = &raw[head..];
    let body = match length {
        Some(n) if n > rest.len() => return Err(format!("the answer was cut: {} of {n} bytes", rest.len())),
        Some(n) => &rest[..n],
        None => rest,
    };
    let body = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?
    };
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_cut_ones_are_errors() {
        let a = parse_answer(&crate::http::response(409, "{\"error\":\"busy\"}", true)).unwrap();
        assert_eq!((a.status, a.message()), (409, "busy".to_string()));
        let full = crate::http::response(200, "{\"a\":1}", true);
        assert!(parse_answer(&full[..full.len() - 1]).unwrap_err().contains("cut"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}

/// Receives into `buf` with at most one descriptor, installed close-on-exec by the
/// kernel as it arrives (`MSG_CMSG_CLOEXEC`: no window in which a child the caller
/// spawns could inherit it). More descriptors than one: the message is refused.
fn recv_with_file(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<std::fs::File>)> {
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // A u64 array keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid "no name, no control" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let n = loop {
        // SAFETY: `msg` points at live buffers (iov -> buf, control) for the call.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let (mut file, mut received) = (None, 0usize);
    // SAFETY: the kernel filled msg_control/msg_controllen and the CMSG_* walk stays
    // inside them; an SCM_RIGHTS entry's descriptors are new and ours, each taken over
    // exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    // Each one is ours to close: an extra one closes when dropped here.
                    let f = std::fs::File::from_raw_fd(std::ptr::read_unaligned(p.add(i)));
                    received += 1;
                    if file.is_none() {
                        file = Some(f);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if received > 1 || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer carried more than one descriptor",
        ));
    }
    Ok((n, file))
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A descriptor passed with an answer arrives close-on-exec (set by the kernel as
    /// it is installed, not afterwards); a second one is refused.
    #[test]
    fn a_passed_descriptor_arrives_close_on_exec() {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        a.send_with_fd(b"HTTP/1.1 200 OK\r\n".as_slice(), f.as_raw_fd()).unwrap();
        let mut buf = [0u8; 64];
        let (n, got) = recv_with_file(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 200 OK\r\n");
        let got = got.unwrap();
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        a.send_with_fds(&[b"x".as_slice()], &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
        assert!(recv_with_file(&b, &mut buf).is_err(), "two descriptors: refused");
    }
}
