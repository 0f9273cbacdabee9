//! Malformed messages from either side get an error reply or a closed connection,
//! never a crash; and the decoders survive arbitrary bytes.
#![allow(clippy::unwrap_used, missing_docs)]

use proptest::prelude::*;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use vfio_user::client::{Client, DmaHandler};
use vfio_user::endpoint::{Endpoint, Error};
use vfio_user::proto::{self, Command, DeviceInfo, DmaAccess, DmaMap, Header, IrqInfo, RegionInfo, SetIrqs};
use vfio_user::server::{Device, Server};

/// A device with one 16-byte register region.
#[derive(Default)]
struct Regs([u8; 16]);

impl Device for Regs {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { flags: 0, num_regions: 1, num_irqs: 0 }
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index == 0).then_some(RegionInfo { flags: 3, index, cap_offset: 0, size: 16, offset: 0 })
    }
    fn irq_info(&self, _index: u32) -> Option<IrqInfo> {
        None
    }
    fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let o = offset as usize;
        let src = self.0.get(o..o + buf.len()).filter(|_| region == 0).ok_or(libc::EINVAL)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        let o = offset as usize;
        let dst = self.0.get_mut(o..o + data.len()).filter(|_| region == 0).ok_or(libc::EINVAL)?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn set_irqs(&mut self, _s: &SetIrqs, _fds: Vec<File>) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

/// Guest memory of 4 KiB at IOVA 0 for the device's DMA requests.
struct Memory(Mutex<Vec<u8>>);

impl DmaHandler for Memory {
    fn dma_read(&self, address: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.0.lock().unwrap();
        let a = address as usize;
        buf.copy_from_slice(m.get(a..a + buf.len()).ok_or(libc::EFAULT)?);
        Ok(())
    }
    fn dma_write(&self, address: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.0.lock().unwrap();
        let a = address as usize;
        m.get_mut(a..a + data.len()).ok_or(libc::EFAULT)?.copy_from_slice(data);
        Ok(())
    }
}

struct Pair {
    client: Client,
    server_ep: Arc<Endpoint>,
    server: std::thread::JoinHandle<Error>,
    closed: mpsc::Receiver<String>,
}

fn pair() -> Pair {
    let (a, b) = UnixStream::pair().unwrap();
    let server_ep = Endpoint::new(b);
    let ep = Arc::clone(&server_ep);
    let server = std::thread::spawn(move || Server::new(ep).serve(&mut Regs::default()));
    let (tx, closed) = mpsc::channel();
    let on_close: vfio_user::client::OnClose = Box::new(move |why| {
        let _ = tx.send(why.to_string());
    });
    let client = Client::connect(a, Arc::new(Memory(Mutex::new(vec![7; 4096]))), on_close).unwrap();
    Pair { client, server_ep, server, closed }
}

fn errno(r: Result<vfio_user::endpoint::Message, Error>) -> i32 {
    match r {
        Err(Error::Remote { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn malformed_requests_to_the_server_get_error_replies_and_the_connection_survives() {
    let p = pair();
    let ep = p.client.endpoint();
    assert_eq!(errno(ep.request_raw(Command::DmaMap as u16, &[1, 2, 3], &[])), libc::EINVAL, "short DMA_MAP");
    let bad_flags = DmaMap { flags: 0x80, offset: 0, address: 0, size: 4096 }.encode();
    assert_eq!(errno(ep.request_raw(Command::DmaMap as u16, &bad_flags, &[])), libc::EINVAL, "undefined DMA_MAP flags");
    let lying = proto::RegionAccess { offset: 0, region: 0, count: 8 }.encode(&[1, 2]);
    assert_eq!(
        errno(ep.request_raw(Command::RegionWrite as u16, &lying, &[])),
        libc::EINVAL,
        "count differs from data"
    );
    let out_of_range = proto::RegionAccess { offset: 12, region: 0, count: 8 }.encode(&[0; 8]);
    assert_eq!(errno(ep.request_raw(Command::RegionWrite as u16, &out_of_range, &[])), libc::EINVAL);
    assert_eq!(errno(ep.request_raw(99, &[], &[])), libc::ENOSYS, "undefined command");
    assert_eq!(
        errno(ep.request_raw(Command::DmaRead as u16, &DmaAccess { address: 0, count: 4 }.encode(&[]), &[])),
        libc::ENOTSUP
    );
    // Still serving.
    p.client.region_write(0, 4, &[9, 8, 7, 6]).unwrap();
    let mut b = [0u8; 4];
    p.client.region_read(0, 4, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7, 6]);
}

#[test]
fn a_garbage_header_closes_the_connection_without_a_crash() {
    let p = pair();
    // A header claiming a 2 GiB message: unframeable, so the server hangs up.
    let mut raw = Header { id: 1, command: 9, size: 0x8000_0000, flags: 0, error: 0 }.to_bytes().to_vec();
    raw.extend_from_slice(&[0; 16]);
    p.client.endpoint().send_bytes_for_tests(&raw);
    let why = p.server.join().unwrap();
    assert!(matches!(why, Error::Proto(_)), "{why}");
    let closed = p.closed.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(closed.contains("closed"), "{closed}");
    assert!(p.client.region_read(0, 0, &mut [0; 4]).is_err());
}

#[test]
fn malformed_device_requests_to_the_client_get_error_replies() {
    let p = pair();
    let ep = &p.server_ep;
    let read = |a: u64, n: u64| ep.request(Command::DmaRead, &DmaAccess { address: a, count: n }.encode(&[]), &[]);
    let r = read(0x10, 4).unwrap();
    assert_eq!(DmaAccess::decode(&r.payload, true).unwrap().1, &[7, 7, 7, 7], "a good DMA_READ is served");
    assert_eq!(errno(read(0x2000, 4)), libc::EFAULT, "outside guest memory");
    assert_eq!(errno(read(0, u64::MAX)), libc::EINVAL, "count beyond the transfer limit");
    let lying = DmaAccess { address: 0, count: 16 }.encode(&[1, 2, 3]);
    assert_eq!(errno(ep.request(Command::DmaWrite, &lying, &[])), libc::EINVAL, "count differs from data");
    assert_eq!(errno(ep.request(Command::DeviceReset, &[], &[])), libc::ENOTSUP, "a device may not reset the VMM");
    // The client still answers.
    ep.request(Command::DmaWrite, &DmaAccess { address: 0, count: 2 }.encode(&[1, 2]), &[]).unwrap();
    assert_eq!(DmaAccess::decode(&read(0, 2).unwrap().payload, true).unwrap().1, &[1, 2]);
    // Garbage from the device: the client hangs up and reports it.
    ep.send_bytes_for_tests(&Header { id: 9, command: 11, size: 3, flags: 0, error: 0 }.to_bytes());
    let closed = p.closed.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(closed.contains("protocol"), "{closed}");
    drop(p.client);
    let _ = p.server.join();
}

#[test]
fn a_vanished_peer_fails_waiting_requests_instead_of_hanging() {
    let p = pair();
    p.server_ep.shutdown();
    let _ = p.server.join();
    assert!(p.closed.recv_timeout(Duration::from_secs(5)).is_ok());
    assert!(matches!(p.client.region_read(0, 0, &mut [0; 4]), Err(Error::Closed)));
    let _ = std::io::stderr().flush();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), cmd in 0u16..24) {
        let mut hdr = [0u8; proto::HEADER_SIZE];
        let n = bytes.len().min(proto::HEADER_SIZE);
        hdr[..n].copy_from_slice(&bytes[..n]);
        let _ = Header::from_bytes(&hdr);
        let payload = &bytes[n..];
        let header = Header { id: 0, command: cmd, size: (proto::HEADER_SIZE + payload.len()) as u32, flags: 0, error: 0 };
        let _ = proto::decode_request(&header, payload);
        let _ = proto::Version::decode(payload);
        let _ = proto::RegionAccess::decode(payload, true);
        let _ = proto::DmaAccess::decode(payload, false);
    }
}
