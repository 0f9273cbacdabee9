//! Device migration, the device's side, as vfio-user 0.2 and libvfio-user define it:
//! DEVICE_FEATURE (MIGRATION, MIG_DEVICE_STATE), MIG_DATA_READ and MIG_DATA_WRITE.
//!
//! [`MigrationState`] keeps the protocol's rules so a device only does the work of
//! each arc ([`Migration::transition`]): the direct arcs RUNNING<->STOP,
//! STOP<->STOP_COPY, STOP<->RESUMING; any other pair goes through STOP, one callback per
//! arc; PRE_COPY and the P2P states are not offered (MIGRATION answers STOP_COPY only)
//! and are refused, as are ERROR and unknown values. A failed arc leaves the state at
//! the last arc completed (libvfio-user's behaviour). In STOP and STOP_COPY only
//! REGION_READ, REGION_WRITE, DEVICE_FEATURE and MIG_DATA_READ are served. A device
//! without [`Migration`] answers EINVAL to every feature, as libvfio-user does.

use crate::proto::{DeviceFeature, MigData, Request, mig};

/// What a device that can be migrated does.
pub trait Migration {
    /// The device's work for one arc `from` -> `to` (e.g. RUNNING -> STOP: finish the
    /// DMA in flight, start nothing new; STOP -> STOP_COPY: capture the state;
    /// RESUMING -> STOP: apply the state written). An error is an errno.
    fn transition(&mut self, from: u32, to: u32) -> Result<(), i32>;
    /// The next bytes of the captured state (STOP_COPY), at most `max`; empty at the end.
    fn read_data(&mut self, max: usize) -> Result<Vec<u8>, i32>;
    /// More bytes of the state being loaded (RESUMING); all of them are taken or none.
    fn write_data(&mut self, data: &[u8]) -> Result<(), i32>;
}

/// The direct arcs passthru's devices offer.
const ARCS: [(u32, u32); 6] = [
    (mig::STATE_RUNNING, mig::STATE_STOP),
    (mig::STATE_STOP, mig::STATE_RUNNING),
    (mig::STATE_STOP, mig::STATE_STOP_COPY),
    (mig::STATE_STOP_COPY, mig::STATE_STOP),
    (mig::STATE_STOP, mig::STATE_RESUMING),
    (mig::STATE_RESUMING, mig::STATE_STOP),
];

/// The arcs from `from` to `to`: none (same state), one, or two through STOP. None
/// when `to` cannot be reached (not offered, ERROR, unknown).
pub fn path(from: u32, to: u32) -> Option<Vec<(u32, u32)>> {
    let offered = [mig::STATE_STOP, mig::STATE_RUNNING, mig::STATE_STOP_COPY, mig::STATE_RESUMING];
    if !offered.contains(&to) || !offered.contains(&from) {
        return None;
    }
    if from == to {
        return Some(Vec::new());
    }
    if ARCS.contains(&(from, to)) {
        return Some(vec![(from, to)]);
    }
    Some(vec![(from, mig::STATE_STOP), (mig::STATE_STOP, to)])
}

/// The migration state of one device connection.
#[derive(Debug)]
pub struct MigrationState {
    state: u32,
}

impl Default for MigrationState {
    fn default() -> MigrationState {
        MigrationState { state: mig::STATE_RUNNING }
    }
}

impl MigrationState {
    /// The current state.
    pub fn state(&self) -> u32 {
        self.state
    }

    /// May `req` run in the current state?
    pub fn allows(&self, req: &Request) -> bool {
        if !matches!(self.state, mig::STATE_STOP | mig::STATE_STOP_COPY) {
            return true;
        }
        matches!(
            req,
            Request::RegionRead(_) | Request::RegionWrite(..) | Request::DeviceFeature(_) | Request::MigDataRead(_)
        )
    }

    /// DEVICE_FEATURE: the reply's payload, or an errno.
    pub fn feature(&mut self, device: Option<&mut dyn Migration>, f: &DeviceFeature) -> Result<Vec<u8>, i32> {
        let device = device.ok_or(libc::EINVAL)?;
        let index = f.flags & mig::FEATURE_MASK;
        let (get, set, probe) =
            (f.flags & mig::FEATURE_GET != 0, f.flags & mig::FEATURE_SET != 0, f.flags & mig::FEATURE_PROBE != 0);
        if get && set && !probe {
            return Err(libc::EINVAL);
        }
        let (can_get, can_set) = match index {
            mig::FEATURE_MIGRATION => (true, false),
            mig::FEATURE_MIG_DEVICE_STATE => (true, true),
            _ => return Err(libc::EINVAL),
        };
        if (get && !can_get) || (set && !can_set) || !(get || set || probe) {
            return Err(libc::EINVAL);
        }
        if probe {
            return Ok(f.encode());
        }
        let reply = |data: Vec<u8>| -> Result<Vec<u8>, i32> {
            let argsz = DeviceFeature::SIZE + data.len() as u32;
            if f.argsz < argsz {
                return Err(libc::EINVAL);
            }
            Ok(DeviceFeature { argsz, flags: f.flags, data }.encode())
        };
        match (index, get) {
            (mig::FEATURE_MIGRATION, _) => reply(mig::MIGRATION_STOP_COPY.to_le_bytes().to_vec()),
            (_, true) => reply([self.state.to_le_bytes(), u32::MAX.to_le_bytes()].concat()),
            (_, false) => {
                let to = f.data.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).ok_or(libc::EINVAL)?;
                let arcs = path(self.state, to).ok_or(libc::EINVAL)?;
                for (a, b) in arcs {
                    device.transition(a, b)?;
                    self.state = b;
                }
                Ok(f.encode())
            }
        }
    }

    /// MIG_DATA_READ: the reply's payload (argsz, size, data), or an errno.
    pub fn read(&mut self, device: Option<&mut dyn Migration>, m: &MigData) -> Result<Vec<u8>, i32> {
        let device = device.ok_or(libc::EINVAL)?;
        if self.state != mig::STATE_STOP_COPY || m.argsz < 8 {
            return Err(libc::EINVAL);
        }
        let data = device.read_data(m.size as usize)?;
        let n = data.len().min(m.size as usize);
        Ok(MigData { argsz: 8 + n as u32, size: n as u32 }.encode(&data[..n]))
    }

    /// MIG_DATA_WRITE: an empty reply, or an errno.
    pub fn write(&mut self, device: Option<&mut dyn Migration>, m: &MigData, data: &[u8]) -> Result<Vec<u8>, i32> {
        let device = device.ok_or(libc::EINVAL)?;
        if self.state != mig::STATE_RESUMING || (m.argsz as usize) < 8 + data.len() {
            return Err(libc::EINVAL);
        }
        device.write_data(data).map(|()| Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log {
        arcs: Vec<(u32, u32)>,
        saved: Vec<u8>,
        loaded: Vec<u8>,
        fail_on: Option<(u32, u32)>,
    }

    impl Migration for Log {
        fn transition(&mut self, from: u32, to: u32) -> Result<(), i32> {
            if self.fail_on == Some((from, to)) {
                return Err(libc::EIO);
            }
            self.arcs.push((from, to));
            if to == mig::STATE_STOP_COPY {
                self.saved = b"state!".to_vec();
            }
            Ok(())
        }
        fn read_data(&mut self, max: usize) -> Result<Vec<u8>, i32> {
            let n = max.min(self.saved.len());
            Ok(self.saved.drain(..n).collect())
        }
        fn write_data(&mut self, data: &[u8]) -> Result<(), i32> {
            self.loaded.extend_from_slice(data);
            Ok(())
        }
    }

    fn set(state: u32) -> DeviceFeature {
        DeviceFeature {
            argsz: 16,
            flags: mig::FEATURE_SET | mig::FEATURE_MIG_DEVICE_STATE,
            data: [state.to_le_bytes(), u32::MAX.to_le_bytes()].concat(),
        }
    }

    #[test]
    fn states_walk_their_arcs_one_callback_each_and_data_flows_only_where_allowed() {
        let (mut m, mut d) = (MigrationState::default(), Log::default());
        // MIGRATION: STOP_COPY only.
        let get = DeviceFeature { argsz: 16, flags: mig::FEATURE_GET | mig::FEATURE_MIGRATION, data: vec![] };
        let r = m.feature(Some(&mut d), &get).unwrap();
        assert_eq!(&r[8..], &mig::MIGRATION_STOP_COPY.to_le_bytes());
        // RUNNING -> STOP_COPY: two arcs through STOP.
        m.feature(Some(&mut d), &set(mig::STATE_STOP_COPY)).unwrap();
        assert_eq!(d.arcs, [(2, 1), (1, 3)]);
        assert!(!m.allows(&Request::DeviceReset) && m.allows(&Request::MigDataRead(MigData { argsz: 8, size: 4 })));
        let r = m.read(Some(&mut d), &MigData { argsz: 8, size: 4 }).unwrap();
        assert_eq!(r, [12, 0, 0, 0, 4, 0, 0, 0, b's', b't', b'a', b't']);
        let r = m.read(Some(&mut d), &MigData { argsz: 8, size: 100 }).unwrap();
        assert_eq!(&r[4..8], &2u32.to_le_bytes());
        let r = m.read(Some(&mut d), &MigData { argsz: 8, size: 100 }).unwrap();
        assert_eq!(&r[4..8], &0u32.to_le_bytes(), "size 0: no more data");
        assert_eq!(m.write(Some(&mut d), &MigData { argsz: 9, size: 1 }, b"x"), Err(libc::EINVAL), "not RESUMING");
        // STOP_COPY -> RESUMING through STOP, then data in, then RUNNING.
        m.feature(Some(&mut d), &set(mig::STATE_RESUMING)).unwrap();
        m.write(Some(&mut d), &MigData { argsz: 10, size: 2 }, b"ab").unwrap();
        assert_eq!(m.read(Some(&mut d), &MigData { argsz: 8, size: 4 }), Err(libc::EINVAL), "not STOP_COPY");
        m.feature(Some(&mut d), &set(mig::STATE_RUNNING)).unwrap();
        assert_eq!(d.loaded, b"ab");
        assert_eq!(&d.arcs[2..], [(3, 1), (1, 4), (4, 1), (1, 2)]);
        // GET reports the state.
        let g = DeviceFeature { argsz: 16, flags: mig::FEATURE_GET | mig::FEATURE_MIG_DEVICE_STATE, data: vec![] };
        assert_eq!(&m.feature(Some(&mut d), &g).unwrap()[8..12], &mig::STATE_RUNNING.to_le_bytes());
    }

    #[test]
    fn refusals_follow_libvfio_user() {
        let (mut m, mut d) = (MigrationState::default(), Log::default());
        for bad in [mig::STATE_PRE_COPY, mig::STATE_RUNNING_P2P, mig::STATE_ERROR, 99] {
            assert_eq!(m.feature(Some(&mut d), &set(bad)), Err(libc::EINVAL), "state {bad}");
        }
        let both = DeviceFeature { argsz: 16, flags: mig::FEATURE_GET | mig::FEATURE_SET | 2, data: vec![0; 8] };
        assert_eq!(m.feature(Some(&mut d), &both), Err(libc::EINVAL));
        let set_mig = DeviceFeature { argsz: 16, flags: mig::FEATURE_SET | mig::FEATURE_MIGRATION, data: vec![0; 8] };
        assert_eq!(m.feature(Some(&mut d), &set_mig), Err(libc::EINVAL));
        assert_eq!(m.feature(None, &set(mig::STATE_STOP)), Err(libc::EINVAL), "no migration support");
        // A failed arc leaves the state at the last one completed.
        d.fail_on = Some((mig::STATE_STOP, mig::STATE_STOP_COPY));
        assert_eq!(m.feature(Some(&mut d), &set(mig::STATE_STOP_COPY)), Err(libc::EIO));
        assert_eq!(m.state(), mig::STATE_STOP);
    }
}
