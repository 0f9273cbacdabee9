//! The VMM core's own hypercalls (block [`abi::hcall::CORE_BASE`]): the null call,
//! benchmark marks and, in a VM built with them, the test interrupt sources
//! (`devices::test_irq`).

use abi::hcall::{self, Args, Ret, Status};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_api::HypercallHandler;

/// Timestamps recorded by `BENCH_MARK` hypercalls.
#[derive(Debug)]
pub struct BenchMarks {
    iterations: AtomicU64,
    marks: Mutex<Vec<(u64, u64, Instant)>>,
}

/// Most marks kept: a guest cannot grow the list without bound.
const MAX_MARKS: usize = 1024;

impl BenchMarks {
    /// A recorder telling guests to run `iterations` per probe.
    pub fn new(iterations: u64) -> BenchMarks {
        BenchMarks { iterations: AtomicU64::new(iterations), marks: Mutex::new(Vec::new()) }
    }

    /// Sets the iteration count handed to guests.
    pub fn set_iterations(&self, n: u64) {
        self.iterations.store(n, Ordering::Relaxed);
    }

    fn mark(&self, tag: u64, value: u64) -> u64 {
        let now = Instant::now();
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() < MAX_MARKS {
            m.push((tag, value, now));
        }
        self.iterations.load(Ordering::Relaxed)
    }

    /// The marks recorded so far, in order: (tag, value, time).
    pub fn marks(&self) -> Vec<(u64, u64, Instant)> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Answers NONCOHERENT_QUERY (set once the VM's device manager exists).
pub type Query = Box<dyn Fn(u64) -> Ret + Send + Sync>;

/// The core hypercall block.
pub struct CoreCalls {
    /// Benchmark marks.
    pub bench: Arc<BenchMarks>,
    /// NONCOHERENT_QUERY.
    pub noncoherent: std::sync::OnceLock<Query>,
    /// The test interrupt sources, when the VM has them.
    #[cfg(feature = "test-sources")]
    pub test: Option<Arc<devices::test_irq::TestSources>>,
}

impl HypercallHandler for CoreCalls {
    fn name(&self) -> &str {
        "core"
    }

    fn call(&self, a: &Args) -> Ret {
        match a.nr {
            hcall::NULL => Ret::ok(0, 0, 0),
            hcall::BENCH_MARK => Ret::ok(self.bench.mark(a.a[0], a.a[1]), 0, 0),
            hcall::NONCOHERENT_QUERY => match self.noncoherent.get() {
                Some(q) => q(a.a[0]),
                None => Ret::err(Status::UnknownCall),
            },
            #[cfg(feature = "test-sources")]
            nr if devices::test_irq::TestSources::answers(nr) => match &self.test {
                Some(t) => t.call(a),
                None => Ret::err(Status::UnknownCall),
            },
            _ => Ret::err(Status::UnknownCall),
        }
    }
}
