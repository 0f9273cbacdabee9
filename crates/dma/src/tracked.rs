//! What domains and the VM's DMA state need of an endpoint attached to them: to make
//! its accessors re-translate and wait for their accesses in flight, and its counts.
//! (The endpoint implements it; holding it as a trait keeps the domain and the VM's
//! state below the endpoint.)

/// An endpoint as a domain or the VM's DMA state tracks it.
pub(crate) trait Tracked: Send + Sync {
    /// Makes later accesses re-translate and waits until none that began before is
    /// still in flight.
    fn invalidate(&self);
    /// Its accessors (DMA spaces) now.
    fn accessors(&self) -> usize;
    /// Faults its accessors recorded.
    fn faults_total(&self) -> u64;
}
