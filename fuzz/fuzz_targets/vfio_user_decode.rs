//! Fuzzes the vfio-user message decoders: a header and payload from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_user::proto::{self, HEADER_SIZE, Header};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_SIZE {
        return;
    }
    let mut hdr = [0u8; HEADER_SIZE];
    hdr.copy_from_slice(&data[..HEADER_SIZE]);
    let payload = &data[HEADER_SIZE..];
    if let Ok(h) = Header::from_bytes(&hdr) {
        let h = Header { size: (HEADER_SIZE + payload.len()) as u32, ..h };
        let _ = proto::decode_request(&h, payload);
    }
    let _ = proto::Version::decode(payload);
    let _ = proto::DmaMap::decode(payload);
    let _ = proto::RegionAccess::decode(payload, true);
    let _ = proto::DmaAccess::decode(payload, true);
});
