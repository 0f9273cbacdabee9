//! The server in process, driven with raw sockets: the client limit, stop with clients
//! connected, and the socket's lifetime.
#![allow(clippy::unwrap_used)]

use api::{ApiError, Command, Handler, Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

struct Count(AtomicU64);

impl Handler for Count {
    fn handle(&self, c: Command) -> Result<serde_json::Value, ApiError> {
        match c {
            Command::Pause => Ok(serde_json::json!({ "n": self.0.fetch_add(1, Ordering::SeqCst) + 1 })),
            _ => Err(ApiError::conflict("only pause here")),
        }
    }
}

fn path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("passthru-apisrv-{tag}-{}.sock", std::process::id()))
}

/// Idle connections hold no slot against a client with a request: a newcomer takes
/// an idle one's slot; only when every client is mid-request is it answered 503. An
/// idle connection is closed after the request deadline, however often it reconnects.
#[test]
fn idle_connections_give_way_and_only_busy_ones_make_a_newcomer_wait() {
    use std::time::{Duration, Instant};
    let p = path("limit");
    let handler = Arc::new(Count(AtomicU64::new(0)));
    let server = Server::start(&p, handler.clone()).unwrap();
    let pause = |s: &mut UnixStream| {
        s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    // 16 clients that connect and send nothing: the 17th is served at once.
    let idle: Vec<UnixStream> = (0..api::server::MAX_CLIENTS).map(|_| UnixStream::connect(&p).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let answer = pause(&mut UnixStream::connect(&p).unwrap());
    assert!(answer.starts_with("HTTP/1.1 200 "), "an idle client gave its slot up: {answer}");
    assert_eq!(server.stats().evicted, 1);
    // The idle ones are closed by the deadline: a first byte must come within it.
    let t = Instant::now();
    for mut s in idle {
        let mut b = [0u8; 16];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "closed");
    }
    let took = t.elapsed();
    assert!(took < api::server::IDLE_DEADLINE + Duration::from_secs(2), "idle connections closed after {took:?}");
    // 16 clients in the middle of a request: the 17th waits (503), the others go on.
    let mut busy: Vec<UnixStream> = (0..api::server::MAX_CLIENTS)
        .map(|_| {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"PUT /api/v1/vm.pa").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = UnixStream::connect(&p).unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    busy[0].write_all(b"use HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    busy[0].read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("{\"n\":2}"), "{answer}");
    assert_eq!(server.stats().refused, 1);
    // Stopping with clients connected returns (their threads are joined) and removes
    // the socket file.
    drop(server);
    assert!(!p.exists());
    drop(busy);
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let p = path("stale");
    let first = Server::start(&p, Arc::new(Count(AtomicU64::new(0)))).unwrap();
    let e = Server::start(&p, Arc::new(Count(AtomicU64::new(0)))).err().unwrap();
    assert!(e.contains("another process serves it"), "{e}");
    drop(first);
    // A socket file nobody listens on (a crashed VMM's).
    let stale = std::os::unix::net::UnixListener::bind(&p).unwrap();
    drop(stale);
    assert!(p.exists());
    let second = Server::start(&p, Arc::new(Count(AtomicU64::new(0)))).unwrap();
    drop(second);
    std::fs::write(&p, b"not a socket").unwrap();
    let e = Server::start(&p, Arc::new(Count(AtomicU64::new(0)))).err().unwrap();
    assert!(e.contains("not a socket"), "{e}");
    std::fs::remove_file(&p).unwrap();
}

/// docs/openapi.json describes exactly the endpoints the server decodes: every path
/// and method there is one of `ENDPOINTS`, and every endpoint is there.
#[test]
fn the_openapi_document_lists_every_route_and_only_those() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{path} {method}: a summary");
            documented.push((path.clone(), method.to_uppercase()));
        }
    }
    let mut served: Vec<(String, String)> =
        api::command::ENDPOINTS.iter().map(|e| (format!("{}{}", api::PREFIX, e.name), e.method.to_string())).collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    // A PUT that takes a body documents it; one that takes none does not.
    for e in api::command::ENDPOINTS {
        let op = &doc["paths"][format!("{}{}", api::PREFIX, e.name)][e.method.to_lowercase()];
        assert_eq!(op.get("requestBody").is_some(), !e.body.is_empty(), "{}: request body", e.name);
    }
}
