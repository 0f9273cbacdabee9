//! The hypercall registry: each front-end owns a block of call numbers
//! ([`abi::hcall::BLOCK_SIZE`]); a call goes to the owner of its block. A vCPU's write
//! to the hypercall port and the qtest `hcall` command both end in [`HypercallRegistry::dispatch`].

use abi::hcall::{Args, BLOCK_SIZE, Ret, Status};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A hypercall block that cannot be given out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("hypercall block {base:#x}: {reason}")]
pub struct BlockError {
    /// Base call number.
    pub base: u64,
    /// Why.
    pub reason: &'static str,
}

/// A front-end that answers the calls of its block.
pub trait HypercallHandler: Send + Sync {
    /// Name for logs and statistics.
    fn name(&self) -> &str;
    /// Handles one call. Guest-caused problems are statuses, never panics.
    fn call(&self, args: &Args) -> Ret;
}

/// Statuses counted apart; higher raw values share the last counter.
const COUNTED_STATUSES: usize = 16;

/// A block's owner and its calls counted by call number and status.
struct Block {
    handler: Arc<dyn HypercallHandler>,
    counts: Box<[AtomicU64]>,
}

/// How often one call ended with one status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCount {
    /// Call number.
    pub nr: u64,
    /// Name of the front-end owning it.
    pub owner: String,
    /// Raw status ([`Status`]; 15 stands for 15 and above).
    pub status: u64,
    /// Calls.
    pub count: u64,
}

/// Maps call-number blocks to front-ends, and counts every call by number and status
/// (one relaxed atomic add per call).
#[derive(Default)]
pub struct HypercallRegistry {
    blocks: RwLock<BTreeMap<u64, Arc<Block>>>,
    unknown: AtomicU64,
}

impl HypercallRegistry {
    /// An empty registry: every call answers [`Status::UnknownCall`].
    pub fn new() -> HypercallRegistry {
        HypercallRegistry::default()
    }

    /// Gives the block starting at `base` to `handler`.
    pub fn register(&self, base: u64, handler: Arc<dyn HypercallHandler>) -> Result<(), BlockError> {
        if !base.is_multiple_of(BLOCK_SIZE) {
            return Err(BlockError { base, reason: "not aligned to the block size" });
        }
        let mut blocks = self.blocks.write().unwrap_or_else(|e| e.into_inner());
        if blocks.contains_key(&(base / BLOCK_SIZE)) {
            return Err(BlockError { base, reason: "already owned by another front-end" });
        }
        let counts = (0..BLOCK_SIZE as usize * COUNTED_STATUSES).map(|_| AtomicU64::new(0)).collect();
        blocks.insert(base / BLOCK_SIZE, Arc::new(Block { handler, counts }));
        Ok(())
    }

    /// Takes the block starting at `base` back.
    pub fn unregister(&self, base: u64) -> Option<Arc<dyn HypercallHandler>> {
        self.blocks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(base / BLOCK_SIZE))
            .map(|b| Arc::clone(&b.handler))
    }

    /// Dispatches one call to the owner of its block.
    pub fn dispatch(&self, args: &Args) -> Ret {
        let block = self.blocks.read().unwrap_or_else(|e| e.into_inner()).get(&(args.nr / BLOCK_SIZE)).cloned();
        match block {
            Some(b) => {
                let ret = b.handler.call(args);
                let status = (ret.status as usize).min(COUNTED_STATUSES - 1);
                let slot = (args.nr % BLOCK_SIZE) as usize * COUNTED_STATUSES + status;
                if let Some(c) = b.counts.get(slot) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                ret
            }
            None => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
                Ret::err(Status::UnknownCall)
            }
        }
    }

    /// Every (call, status) that happened, with its count, by call number.
    pub fn counts(&self) -> Vec<CallCount> {
        let blocks = self.blocks.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (index, b) in blocks.iter() {
            for (i, c) in b.counts.iter().enumerate() {
                let count = c.load(Ordering::Relaxed);
                if count > 0 {
                    let nr = index * BLOCK_SIZE + (i / COUNTED_STATUSES) as u64;
                    let status = (i % COUNTED_STATUSES) as u64;
                    out.push(CallCount { nr, owner: b.handler.name().to_string(), status, count });
                }
            }
        }
        out
    }

    /// Calls no front-end owned.
    pub fn unknown_calls(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl HypercallHandler for Echo {
        fn name(&self) -> &str {
            "echo"
        }
        fn call(&self, a: &Args) -> Ret {
            Ret::ok(a.nr, a.a[0], a.a[4])
        }
    }

    #[test]
    fn calls_reach_the_owner_of_their_block_only() {
        let r = HypercallRegistry::new();
        r.register(0x300, Arc::new(Echo)).unwrap();
        assert_eq!(r.dispatch(&Args { nr: 0x3ff, a: [1, 2, 3, 4, 5] }), Ret::ok(0x3ff, 1, 5));
        assert_eq!(r.dispatch(&Args { nr: 0x400, a: [0; 5] }).status, Status::UnknownCall);
        assert_eq!(r.dispatch(&Args { nr: u64::MAX, a: [0; 5] }).status, Status::UnknownCall);
        assert!(r.register(0x300, Arc::new(Echo)).is_err(), "block taken");
        assert!(r.register(0x310, Arc::new(Echo)).is_err(), "misaligned");
        let counts = r.counts();
        assert_eq!(counts, vec![CallCount { nr: 0x3ff, owner: "echo".into(), status: 0, count: 1 }]);
        assert_eq!(r.unknown_calls(), 2);
        assert!(r.unregister(0x300).is_some());
        assert_eq!(r.dispatch(&Args { nr: 0x300, a: [0; 5] }).status, Status::UnknownCall);
    }
}
