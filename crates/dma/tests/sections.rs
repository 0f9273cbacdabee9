//! Access sections are bounded: an unmap anywhere in the domain waits for at most one
//! chunk of a long access, not for the whole access (a 1 GiB COPY used to hold every
//! unmap of its domain for its whole duration).
#![allow(clippy::unwrap_used, missing_docs)]

use dma::{DmaSpace, DomainConfig, Gpa, Iova, LockedMemory, Perm, VmDma};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const LONG: u64 = 256 * MIB;

#[test]
fn an_unmap_returns_while_a_long_read_of_the_same_domain_is_still_running() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (LONG + 4 * MIB) as usize)]).unwrap();
    let vm = VmDma::new(Arc::new(mem), LockedMemory::new(u64::MAX));
    let d = vm.create_domain("d", DomainConfig::default());
    d.map(Iova(1 << 32), Gpa(0), LONG, Perm::READ).unwrap();
    let mut overtaken = 0;
    for _ in 0..5 {
        d.map(Iova(1 << 40), Gpa(LONG), MIB, Perm::READ_WRITE).unwrap();
        let (started, finished) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let dev = DmaSpace::new(d.clone(), "reader");
        let reader = {
            let (started, finished) = (started.clone(), finished.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; LONG as usize];
                started.store(true, Ordering::SeqCst);
                dev.read(Iova(1 << 32), &mut buf).unwrap();
                finished.store(true, Ordering::SeqCst);
            })
        };
        while !started.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        // An unrelated mapping goes away while the 256 MiB read runs.
        d.unmap(Iova(1 << 40), MIB).unwrap();
        if !finished.load(Ordering::SeqCst) {
            overtaken += 1;
        }
        reader.join().unwrap();
    }
    // With one section per access the unmap could only return after the read ended.
    assert!(overtaken >= 4, "the unmap overtook the long read in only {overtaken} of 5 runs");
}
