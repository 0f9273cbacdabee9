//! Every wait on a peer has a deadline: a peer that stops reading, one that stops
//! replying and one that floods requests without reading the replies are each declared
//! dead within the deadline, once; nothing blocks past it, and teardown is clean.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use vfio_user::client::{Client, DmaHandler};
use vfio_user::endpoint::{BACKLOG_BYTES, Endpoint, Error};
use vfio_user::proto::{
    self, Command, DeviceInfo, DmaAccess, FLAG_NO_REPLY, HEADER_SIZE, Header, RegionAccess, Version,
};

const DEADLINE: Duration = Duration::from_millis(300);
/// Generous bound for "within the deadline" on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(5);

fn posted_write(ep: &Endpoint, bytes: usize) -> Result<(), Error> {
    let payload = RegionAccess { offset: 0, region: 0, count: bytes as u32 }.encode(&vec![0x5a; bytes]);
    let size = (HEADER_SIZE + payload.len()) as u32;
    ep.send(Header { id: 0, command: Command::RegionWrite as u16, size, flags: FLAG_NO_REPLY, error: 0 }, &payload, &[])
}

#[test]
fn a_peer_that_stops_reading_is_declared_dead_and_no_send_blocks_past_the_deadline() {
    let (ours, _theirs) = UnixStream::pair().unwrap(); // nobody ever reads `_theirs`
    let ep = Endpoint::with_timeout(ours, DEADLINE);
    let start = Instant::now();
    let mut longest = Duration::ZERO;
    let mut sent = 0usize;
    let err = loop {
        let t = Instant::now();
        let r = posted_write(&ep, 64 << 10);
        longest = longest.max(t.elapsed());
        match r {
            Ok(()) => sent += 64 << 10,
            Err(e) => break e,
        }
        assert!(start.elapsed() < SLACK, "still sending after {:?} ({sent} bytes)", start.elapsed());
    };
    assert!(sent >= BACKLOG_BYTES, "the backlog absorbed {sent} bytes before the peer was judged");
    assert!(longest < DEADLINE + Duration::from_secs(2), "one send blocked for {longest:?}");
    assert!(matches!(err, Error::Unresponsive(_)), "{err}");
    assert!(ep.is_closed());
    assert!(ep.death().unwrap().contains("took no bytes"), "{:?}", ep.death());
    // Every later send fails at once.
    let t = Instant::now();
    assert!(matches!(posted_write(&ep, 16), Err(Error::Unresponsive(_))));
    assert!(t.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_peer_that_stops_replying_fails_the_request_at_the_deadline_and_is_dead_after() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    // The peer reads everything and answers nothing.
    let sink = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while theirs.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let ep = Endpoint::with_timeout(ours, DEADLINE);
    let reader = {
        let ep = Arc::clone(&ep);
        std::thread::spawn(move || ep.run(|_| {}))
    };
    let t = Instant::now();
    let r = ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[]);
    let waited = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(Command::DeviceGetInfo, d)) if d == DEADLINE), "{r:?}");
    assert!(waited >= DEADLINE && waited < DEADLINE + SLACK, "{waited:?}");
    assert!(ep.is_closed());
    let why = reader.join().unwrap();
    assert!(matches!(why, Error::Unresponsive(ref s) if s.contains("no reply to DeviceGetInfo")), "{why}");
    let t = Instant::now();
    assert!(ep.request(Command::DeviceGetInfo, &DeviceInfo::default().encode(), &[]).is_err());
    assert!(t.elapsed() < Duration::from_millis(100), "a dead peer answers at once");
    sink.join().unwrap();
}

struct Zeros;
impl DmaHandler for Zeros {
    fn dma_read(&self, _address: u64, buf: &mut [u8]) -> Result<(), i32> {
        buf.fill(0);
        Ok(())
    }
    fn dma_write(&self, _address: u64, _data: &[u8]) -> Result<(), i32> {
        Ok(())
    }
}

/// Reads one whole message from a raw socket.
fn read_msg(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; HEADER_SIZE];
    s.read_exact(&mut h).unwrap();
    let h = Header::from_bytes(&h).unwrap();
    let mut p = vec![0u8; h.payload_len()];
    s.read_exact(&mut p).unwrap();
    (h, p)
}

fn write_reply(s: &mut UnixStream, req: &Header, payload: &[u8]) {
    let h = Header { id: req.id, command: req.command, size: (HEADER_SIZE + payload.len()) as u32, flags: 1, error: 0 };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

#[test]
fn a_device_flooding_dma_reads_without_reading_replies_is_cut_off_and_the_client_drops_cleanly() {
    let (ours, mut dev) = UnixStream::pair().unwrap();
    let flood = std::thread::spawn(move || {
        // Handshake as a minimal server would.
        let (h, _) = read_msg(&mut dev);
        assert_eq!(h.command, Command::Version as u16);
        write_reply(&mut dev, &h, &Version::ours().encode());
        let (h, _) = read_msg(&mut dev);
        write_reply(&mut dev, &h, &DeviceInfo { flags: proto::DEVICE_FLAGS_PCI, num_regions: 0, num_irqs: 0 }.encode());
        // Then DMA_READ after DMA_READ of 1 MiB each, never reading a reply.
        let req = DmaAccess { address: 0, count: 1 << 20 }.encode(&[]);
        let mut sent = 0u32;
        for id in 1.. {
            let h = Header {
                id,
                command: Command::DmaRead as u16,
                size: (HEADER_SIZE + req.len()) as u32,
                flags: 0,
                error: 0,
            };
            if dev.write_all(&h.to_bytes()).and_then(|()| dev.write_all(&req)).is_err() {
                break;
            }
            sent += 1;
            if id == u16::MAX {
                break;
            }
        }
        sent
    });
    let (tx, closed) = mpsc::channel();
    let on_close: vfio_user::client::OnClose = Box::new(move |why| {
        let _ = tx.send(why.to_string());
    });
    let client = Client::connect_with_timeout(ours, Arc::new(Zeros), on_close, DEADLINE).unwrap();
    let why = closed.recv_timeout(SLACK).expect("the flooding device was never cut off");
    assert!(why.contains("stopped responding"), "{why}");
    assert!(client.is_closed());
    let t = Instant::now();
    drop(client);
    assert!(t.elapsed() < Duration::from_secs(1), "dropping the client took {:?}", t.elapsed());
    let sent = flood.join().unwrap();
    assert!(sent >= 4, "the device got {sent} requests in before it was cut off");
}
