//! Fuzzes a device server over a real socket pair: arbitrary bytes written in arbitrary
//! pieces (partial reads), some with file descriptors attached, to passthru's server
//! serving the DMA engine; it must answer or hang up, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use vfio_user::endpoint::Endpoint;
use vfio_user::proto::{HEADER_SIZE, Header, Version};

fuzz_target!(|data: &[u8]| {
    let Ok((mut ours, theirs)) = UnixStream::pair() else { return };
    let server = std::thread::spawn(move || {
        let server =
            vfio_user::server::Server::new(Endpoint::with_timeout(theirs, std::time::Duration::from_millis(100)));
        if let Ok(mut dev) = devices::dma_engine::vfio::EngineServer::remote(&server) {
            server.serve(&mut dev);
        }
    });
    // Usually a valid VERSION first, so the fuzzed messages reach the handlers.
    if data.first().is_some_and(|b| b & 1 == 0) {
        let v = Version::ours().encode();
        let h = Header { id: 1, command: 1, size: (HEADER_SIZE + v.len()) as u32, flags: 0, error: 0 };
        let _ = ours.write_all(&h.to_bytes());
        let _ = ours.write_all(&v);
    }
    let memfd = vmm_sys_util::eventfd::EventFd::new(0).ok();
    let mut rest = data.get(1..).unwrap_or(&[]);
    while !rest.is_empty() {
        let n = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        if piece[0] & 0x40 != 0
            && let Some(fd) = &memfd
        {
            let _ = vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fd(&ours, piece, fd.as_raw_fd());
        } else {
            let _ = ours.write_all(piece);
        }
    }
    let _ = ours.shutdown(std::net::Shutdown::Write);
    // Drain the replies until the server hangs up, then it must end.
    let _ = ours.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = std::io::copy(&mut ours, &mut std::io::sink());
    drop(ours);
    let _ = server.join();
});
