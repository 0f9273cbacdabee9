//! vfio-user, both ends, as specified in QEMU's `docs/interop/vfio-user.rst`.
//!
//! - [`proto`]: the wire format. Pure encoding and decoding, byte-exact with the spec;
//!   every decoder returns an error for malformed input and never panics.
//! - [`endpoint`]: framing over a Unix stream socket with file descriptors, request /
//!   reply matching by message id, and a reader that serves the peer's requests while
//!   local requests wait: either side may send requests at any time (the server sends
//!   DMA_READ / DMA_WRITE for memory it was not given an fd for).
//! - [`client`]: the VMM's side: negotiate, query the device, map and unmap DMA (with a
//!   memfd, or without one so every access is a checked message), forward region
//!   accesses, pass interrupt eventfds, and answer the device's DMA requests.
//! - [`server`]: the device process's side: serve a [`server::Device`] until the VMM
//!   goes away, keeping the protocol's rules (VERSION first, DMA window semantics),
//!   and give the device a handle to reach guest memory in place or by messages.
//! - [`migration`]: device migration (DEVICE_FEATURE, MIG_DATA_READ/WRITE), the state
//!   machine both the server and the VMM's in-process devices use;
//! - [`windows`]: the server's DMA windows, one mapping per distinct file;
//!   [`mapping`]: those mappings, guarded against the file shrinking under them.
//!
//! Why not the rust-vmm `vfio_user` crate (0.1.7): its server refuses DMA_READ and
//! DMA_WRITE and offers a backend no way to send them, and its client is strictly
//! request/response, so the isolated message mode cannot be built on it; it also does
//! not check error replies (a failed region read blocks forever).
#![warn(missing_docs)]

pub mod client;
pub mod endpoint;
pub mod mapping;
pub mod migration;
pub mod proto;
pub mod server;
mod sys;
pub mod windows;

pub use endpoint::Error;
