//! The identity front-end: no guest-visible IOMMU. Devices reach guest RAM at
//! IOVA = guest-physical through one domain that maps all of it, pinned; the guest
//! programs nothing. Every device on this front-end shares that domain (pinned once,
//! charged once); it is emptied when the last one leaves.

use crate::frontend::{Context, Device, Frontend, Registration};
use dma::{Domain, MapError, VmDma};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// `dma=identity`.
pub const REGISTRATION: Registration = Registration {
    name: "identity",
    help: "all guest RAM at IOVA = guest-physical, pinned (no guest-visible IOMMU)",
    build: |ctx| Ok(Arc::new(Identity::new(ctx)) as Arc<dyn Frontend>),
};

struct Shared {
    domain: Option<Arc<Domain>>,
    devices: BTreeSet<u16>,
}

/// The identity front-end of one VM.
pub struct Identity {
    dma: Arc<VmDma>,
    shared: Mutex<Shared>,
}

impl Identity {
    /// The front-end for the VM of `ctx`.
    pub fn new(ctx: &Context) -> Identity {
        Identity { dma: Arc::clone(&ctx.dma), shared: Mutex::new(Shared { domain: None, devices: BTreeSet::new() }) }
    }

    /// The shared domain, while a device uses it.
    pub fn domain(&self) -> Option<Arc<Domain>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).domain.clone()
    }
}

impl Frontend for Identity {
    fn name(&self) -> &str {
        REGISTRATION.name
    }

    fn attach(&self, device: &Device) -> Result<(), String> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let domain = match &s.domain {
            Some(d) => Arc::clone(d),
            None => {
                let d = self.dma.identity_domain("identity").map_err(|e| match e {
                    MapError::NoMemory { limit, .. } => {
                        let ram = vm_memory::GuestMemoryBackend::iter(self.dma.memory().as_ref())
                            .map(vm_memory::GuestMemoryRegion::len)
                            .sum::<u64>()
                            >> 20;
                        format!(
                            "its identity DMA domain pins all {ram} MiB of guest RAM, over the locked-memory limit \
                             of {} MiB; pass --locked-memory {ram}M (or raise `ulimit -l`), or give the guest less \
                             --memory",
                            limit >> 20
                        )
                    }
                    other => other.to_string(),
                })?;
                s.domain = Some(Arc::clone(&d));
                d
            }
        };
        if let Err(e) = device.endpoint.attach(Some(domain)) {
            if s.devices.is_empty() {
                s.domain = None;
            }
            return Err(format!("attaching it to the identity domain: {e}"));
        }
        s.devices.insert(device.id);
        Ok(())
    }

    fn detach(&self, id: u16) {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.devices.remove(&id) && s.devices.is_empty() {
            // The last user: unpin guest RAM.
            if let Some(d) = s.domain.take() {
                d.unmap_all();
            }
        }
    }

    fn stats(&self) -> String {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let mappings = s.domain.as_ref().map_or(0, |d| d.mapping_count());
        format!("devices={} mappings={mappings}", s.devices.len())
    }

    fn device_stats(&self, id: u16) -> Option<String> {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.devices.contains(&id).then(|| format!("mappings={}", s.domain.as_ref().map_or(0, |d| d.mapping_count())))
    }
}
