//! passthru's control API: what operators use to drive a running VM.
//!
//! HTTP/1.1 with JSON bodies on a Unix socket (mode 0600), as Firecracker's and
//! cloud-hypervisor's API sockets. Endpoints are `/api/v1/NAME` ([`command`] lists
//! them); a request is framed by [`http`] (httparse, hard limits on head and body),
//! decoded into a [`Command`] (400 naming the problem, 404 for unknown paths), carried
//! out by the VMM's [`Handler`], and answered with a JSON body. [`server`] serves many
//! clients at once with a deadline on every read and write; [`client`] is the small
//! client `passthru ctl` and `passthru stat` use.

pub mod client;
pub mod command;
pub mod http;
pub mod server;

pub use command::{Command, decode};
pub use server::{Handler, Server};

/// An answer that is not a success: an HTTP status and a message naming the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status code (400, 404, 405, 409, 413, 500, 503...).
    pub status: u16,
    /// What went wrong, for a human.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into() }
    }

    /// 404: no such endpoint or object.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { status: 404, message: message.into() }
    }

    /// 409: the request conflicts with the VM's state (nothing was changed).
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError { status: 409, message: message.into() }
    }

    /// 500: the VMM failed to carry out a well-formed request (nothing half-done).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: 500, message: message.into() }
    }

    /// The JSON body of the error answer: `{"error": "..."}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message }).to_string()
    }
}

/// The path prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";
