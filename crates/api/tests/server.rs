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

#[test]
fn past_the_client_limit_a_connection_is_answered_503_and_the_others_still_work() {
    let p = path("limit");
    let handler = Arc::new(Count(AtomicU64::new(0)));
    let server = Server::start(&p, handler.clone()).unwrap();
    let held: Vec<UnixStream> = (0..api::server::MAX_CLIENTS).map(|_| UnixStream::connect(&p).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut extra = UnixStream::connect(&p).unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    // A held connection is served.
    let mut s = &held[0];
    s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("{\"n\":1}"), "{answer}");
    assert_eq!(server.stats().refused, 1);
    // Stopping with 15 idle clients connected returns (their threads are joined) and
    // removes the socket file.
    drop(server);
    assert!(!p.exists());
    drop(held);
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
