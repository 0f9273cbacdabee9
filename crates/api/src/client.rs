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
    let (n, file) = {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        s.recv_with_fd(&mut first).map_err(|e| format!("reading the answer from {shown}: {e}"))?
    };
    first.truncate(n);
    if let Some(f) = &file {
        use std::os::fd::AsRawFd;
        // recvmsg without MSG_CMSG_CLOEXEC: close it on exec ourselves (a child the
        // caller spawns must not inherit the table).
        // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut raw = first;
    if n > 0 {
        (&mut s)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| format!("reading the answer from {shown}: {e}"))?;
    }
    Ok((parse_answer(&raw)?, file.into_iter().collect()))
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
