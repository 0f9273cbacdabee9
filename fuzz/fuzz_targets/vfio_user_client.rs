//! Fuzzes the VMM's side of a connection: after a valid handshake, a "device" sends
//! arbitrary bytes in arbitrary pieces (DMA_READ / DMA_WRITE and anything else) to the
//! client, whose reader serves them against a small memory; it must answer or hang
//! up, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vfio_user::client::{Client, DmaHandler};
use vfio_user::proto::{DeviceInfo, HEADER_SIZE, Header, Version};

struct Memory(Mutex<Vec<u8>>);

impl DmaHandler for Memory {
    fn dma_read(&self, address: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.0.lock().map_err(|_| libc::EIO)?;
        let a = usize::try_from(address).map_err(|_| libc::EFAULT)?;
        let src = a.checked_add(buf.len()).and_then(|e| m.get(a..e)).ok_or(libc::EFAULT)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn dma_write(&self, address: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.0.lock().map_err(|_| libc::EIO)?;
        let a = usize::try_from(address).map_err(|_| libc::EFAULT)?;
        let dst = a.checked_add(data.len()).and_then(|e| m.get_mut(a..e)).ok_or(libc::EFAULT)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn read_msg(s: &mut UnixStream) -> Option<Header> {
    let mut h = [0u8; HEADER_SIZE];
    s.read_exact(&mut h).ok()?;
    let h = Header::from_bytes(&h).ok()?;
    let mut p = vec![0u8; h.payload_len()];
    s.read_exact(&mut p).ok()?;
    Some(h)
}

fn reply(s: &mut UnixStream, req: &Header, payload: &[u8]) {
    let h = Header { id: req.id, command: req.command, size: (HEADER_SIZE + payload.len()) as u32, flags: 1, error: 0 };
    let _ = s.write_all(&h.to_bytes());
    let _ = s.write_all(payload);
}

fuzz_target!(|data: &[u8]| {
    let Ok((ours, mut dev)) = UnixStream::pair() else { return };
    let _ = dev.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let fake = std::thread::spawn(move || {
        let h = read_msg(&mut dev)?;
        reply(&mut dev, &h, &Version::ours().encode());
        let h = read_msg(&mut dev)?;
        reply(&mut dev, &h, &DeviceInfo { flags: 2, num_regions: 0, num_irqs: 0 }.encode());
        Some(dev)
    });
    let memory = Arc::new(Memory(Mutex::new(vec![0x5a; 4096])));
    let timeout = std::time::Duration::from_secs(2);
    let Ok(client) = Client::connect_with_timeout(ours, memory, Box::new(|_| {}), timeout) else { return };
    let Ok(Some(mut dev)) = fake.join() else { return };
    let mut rest = data;
    while !rest.is_empty() {
        let n = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        if dev.write_all(piece).is_err() {
            break;
        }
    }
    let _ = dev.shutdown(std::net::Shutdown::Write);
    let _ = std::io::copy(&mut dev, &mut std::io::sink());
    drop(client);
});
