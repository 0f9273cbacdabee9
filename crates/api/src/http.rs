//! HTTP/1.1 framing: a request's head is parsed by `httparse` (the parser hyper uses),
//! its body delimited by Content-Length; hard limits keep a client from making the VMM
//! allocate without bound. Answers are always JSON with a Content-Length.

use crate::ApiError;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 << 10;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// Most headers one request may carry.
pub const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`...
    pub method: String,
    /// The request target, e.g. `/api/v1/vm.info`.
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
    /// The client wants the connection kept open after the answer.
    pub keep_alive: bool,
}

/// What the bytes received so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `expect_continue`: the head is complete and the client
    /// waits for `100 Continue` before it sends its body.
    Incomplete {
        /// See above.
        expect_continue: bool,
    },
    /// A request, and how many bytes of the buffer it took.
    Complete(Request, usize),
}

/// Parses the start of `buf` as one request. Errors are the answers to send (400,
/// 413, 431, 505) before closing the connection.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(too_large_head());
            }
            return Ok(Parsed::Incomplete { expect_continue: false });
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError { status: 431, message: format!("more than {MAX_HEADERS} headers") });
        }
        Err(e) => return Err(ApiError::bad_request(format!("malformed HTTP request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(too_large_head());
    }
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    let http11 = req.version == Some(1);
    let (mut length, mut keep_alive, mut expect_continue) = (None::<usize>, http11, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| ApiError::bad_request("a header value is not UTF-8"))?;
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| ApiError::bad_request(format!("Content-Length '{value}' is not a number")))?;
            if length.is_some_and(|m| m != n) {
                return Err(ApiError::bad_request("two different Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError {
                status: 411,
                message: format!("Transfer-Encoding '{value}' is not accepted: send the body with a Content-Length"),
            });
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(ApiError { status: 417, message: format!("Expect '{value}' is not supported") });
            }
            expect_continue = true;
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(ApiError {
            status: 413,
            message: format!("a body of {length} bytes is over the limit of {MAX_BODY}"),
        });
    }
    let end = head_len + length; // both bounded above: no overflow
    if buf.len() < end {
        return Ok(Parsed::Incomplete { expect_continue: expect_continue && buf.len() == head_len });
    }
    Ok(Parsed::Complete(Request { method, path, body: buf[head_len..end].to_vec(), keep_alive }, end))
}

fn too_large_head() -> ApiError {
    ApiError { status: 431, message: format!("the request head is over the limit of {MAX_HEAD} bytes") }
}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// An answer: status line, JSON content type and length, `Connection: close` when the
/// server closes after it.
pub fn response(status: u16, body: &str, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: passthru\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> Request {
        match parse_request(raw.as_bytes()) {
            Ok(Parsed::Complete(r, n)) => {
                assert_eq!(n, raw.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_frame_by_content_length_and_keep_alive_follows_the_version() {
        let r = complete("PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), &r.body[..], r.keep_alive),
            ("PUT", "/api/v1/vm.pause", &b"{}"[..], true)
        );
        let r = complete("GET /api/v1/vm.info HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive && r.body.is_empty());
        let r = complete("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive);
        // Two pipelined requests: the first takes only its own bytes.
        let two = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let Ok(Parsed::Complete(r, n)) = parse_request(two.as_bytes()) else { panic!() };
        assert_eq!((r.path.as_str(), n), ("/a", two.len() / 2));
    }

    #[test]
    fn partial_requests_wait_and_expect_continue_is_seen_once_the_head_is_in() {
        assert_eq!(parse_request(b"GET /api/v1/vm.in"), Ok(Parsed::Incomplete { expect_continue: false }));
        let head = "PUT /x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(parse_request(head.as_bytes()), Ok(Parsed::Incomplete { expect_continue: true }));
        let more = format!("{head}ab");
        assert_eq!(parse_request(more.as_bytes()), Ok(Parsed::Incomplete { expect_continue: false }));
    }

    #[test]
    fn limits_and_malformed_heads_are_errors_with_their_status() {
        let status = |raw: &[u8]| parse_request(raw).err().map(|e| e.status);
        assert_eq!(status(b"NOT HTTP AT ALL\r\n\r\n"), Some(400));
        assert_eq!(status(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"), Some(413));
        assert_eq!(status(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"), Some(400));
        assert_eq!(status(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), Some(400));
        assert_eq!(status(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Some(411));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1));
        assert_eq!(status(long.as_bytes()), Some(431));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), Some(431));
    }

    #[test]
    fn answers_carry_their_length() {
        let r = String::from_utf8(response(404, "{\"error\":\"x\"}", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Length: 13\r\n") && r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n{\"error\":\"x\"}"));
    }
}
