//! The hypercall registry: each front-end owns a block of call numbers
//! ([`abi::hcall::BLOCK_SIZE`]); a call goes to the owner of its block. A vCPU's write
//! to the hypercall port and the qtest `hcall` command both end in [`HypercallRegistry::dispatch`].

use abi::hcall::{Args, BLOCK_SIZE, Ret, Status};
use std::collections::BTreeMap;
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

/// Maps call-number blocks to front-ends.
#[derive(Default)]
pub struct HypercallRegistry {
    blocks: RwLock<BTreeMap<u64, Arc<dyn HypercallHandler>>>,
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
        blocks.insert(base / BLOCK_SIZE, handler);
        Ok(())
    }

    /// Takes the block starting at `base` back.
    pub fn unregister(&self, base: u64) -> Option<Arc<dyn HypercallHandler>> {
        self.blocks.write().unwrap_or_else(|e| e.into_inner()).remove(&(base / BLOCK_SIZE))
    }

    /// Dispatches one call to the owner of its block.
    pub fn dispatch(&self, args: &Args) -> Ret {
        let handler = self.blocks.read().unwrap_or_else(|e| e.into_inner()).get(&(args.nr / BLOCK_SIZE)).cloned();
        match handler {
            Some(h) => h.call(args),
            None => Ret::err(Status::UnknownCall),
        }
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
        assert!(r.unregister(0x300).is_some());
        assert_eq!(r.dispatch(&Args { nr: 0x300, a: [0; 5] }).status, Status::UnknownCall);
    }
}
