//! virtio-iommu requests as they arrive: the device-readable part decoded from its
//! little-endian bytes (`abi::viommu` gives the layout). Decoding never fails on
//! values, only on length: checking them is the device's.

use abi::viommu::{req, size};

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// A decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH.
    Attach {
        /// Domain.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
        /// Flags.
        flags: u32,
        /// The reserved bytes are not all zero.
        reserved: bool,
    },
    /// DETACH.
    Detach {
        /// Domain.
        domain: u32,
        /// Endpoint.
        endpoint: u32,
    },
    /// MAP (inclusive end).
    Map {
        /// Domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA.
        virt_end: u64,
        /// First guest-physical address.
        phys_start: u64,
        /// Flags.
        flags: u32,
    },
    /// UNMAP (inclusive end).
    Unmap {
        /// Domain.
        domain: u32,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA.
        virt_end: u64,
        /// The reserved bytes are not all zero.
        reserved: bool,
    },
    /// PROBE.
    Probe {
        /// Endpoint.
        endpoint: u32,
    },
}

/// How long the device-readable part of a request of `kind` is (None: not a type the
/// device recognises).
pub fn readable_len(kind: u8) -> Option<u64> {
    Some(match kind {
        req::ATTACH => size::ATTACH,
        req::DETACH => size::DETACH,
        req::MAP => size::MAP,
        req::UNMAP => size::UNMAP,
        req::PROBE => size::PROBE,
        _ => return None,
    })
}

/// Decodes a request from its readable bytes (`b`, at least [`readable_len`]).
pub fn decode(b: &[u8]) -> Option<Request> {
    let kind = *b.first()?;
    if (b.len() as u64) < readable_len(kind)? {
        return None;
    }
    Some(match kind {
        req::ATTACH => Request::Attach {
            domain: u32_at(b, 4),
            endpoint: u32_at(b, 8),
            flags: u32_at(b, 12),
            reserved: b[16..20].iter().any(|x| *x != 0),
        },
        req::DETACH => Request::Detach { domain: u32_at(b, 4), endpoint: u32_at(b, 8) },
        req::MAP => Request::Map {
            domain: u32_at(b, 4),
            virt_start: u64_at(b, 8),
            virt_end: u64_at(b, 16),
            phys_start: u64_at(b, 24),
            flags: u32_at(b, 32),
        },
        req::UNMAP => Request::Unmap {
            domain: u32_at(b, 4),
            virt_start: u64_at(b, 8),
            virt_end: u64_at(b, 16),
            reserved: b[24..28].iter().any(|x| *x != 0),
        },
        req::PROBE => Request::Probe { endpoint: u32_at(b, 4) },
        _ => return None,
    })
}

/// Encodes `r` as a driver lays it out (head and payload; the tail follows in the
/// writable part). For drivers outside a guest: tests, replay, benchmarks.
pub fn encode(r: &Request) -> Vec<u8> {
    let mut b = Vec::new();
    let u32le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
    let u64le = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
    match *r {
        Request::Attach { domain, endpoint, flags, reserved } => {
            b.extend_from_slice(&[req::ATTACH, 0, 0, 0]);
            u32le(&mut b, domain);
            u32le(&mut b, endpoint);
            u32le(&mut b, flags);
            b.extend_from_slice(&[u8::from(reserved), 0, 0, 0]);
        }
        Request::Detach { domain, endpoint } => {
            b.extend_from_slice(&[req::DETACH, 0, 0, 0]);
            u32le(&mut b, domain);
            u32le(&mut b, endpoint);
            b.extend_from_slice(&[0; 8]);
        }
        Request::Map { domain, virt_start, virt_end, phys_start, flags } => {
            b.extend_from_slice(&[req::MAP, 0, 0, 0]);
            u32le(&mut b, domain);
            u64le(&mut b, virt_start);
            u64le(&mut b, virt_end);
            u64le(&mut b, phys_start);
            u32le(&mut b, flags);
        }
        Request::Unmap { domain, virt_start, virt_end, reserved } => {
            b.extend_from_slice(&[req::UNMAP, 0, 0, 0]);
            u32le(&mut b, domain);
            u64le(&mut b, virt_start);
            u64le(&mut b, virt_end);
            b.extend_from_slice(&[u8::from(reserved), 0, 0, 0]);
        }
        Request::Probe { endpoint } => {
            b.extend_from_slice(&[req::PROBE, 0, 0, 0]);
            u32le(&mut b, endpoint);
            b.extend_from_slice(&[0; 64]);
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_to_their_spec_sizes_and_decode_back() {
        let all = [
            Request::Attach { domain: 7, endpoint: 8, flags: 1, reserved: false },
            Request::Detach { domain: 7, endpoint: 8 },
            Request::Map { domain: 7, virt_start: 0x1000, virt_end: 0x1fff, phys_start: 0xa000, flags: 3 },
            Request::Unmap { domain: 7, virt_start: 0x1000, virt_end: 0x1fff, reserved: false },
            Request::Probe { endpoint: 8 },
        ];
        for r in all {
            let b = encode(&r);
            assert_eq!(Some(b.len() as u64), readable_len(b[0]), "{r:?}");
            assert_eq!(decode(&b), Some(r));
            assert_eq!(decode(&b[..b.len() - 1]), None, "too short");
        }
        assert_eq!(readable_len(9), None);
    }
}
