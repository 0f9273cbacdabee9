//! Pausing and resuming a VM: the vCPU parked (`run_control`), every device stopped
//! through [`vm_api::Pausable`] (vfio-user STOP), front-ends' workers stopped and the
//! test sources parked; resumed
//! in reverse, a device that does not run again declared gone.

use crate::device_manager::AssignedDevice;
use crate::vm::Vm;

impl Vm {
    /// Stops the vCPU at an instruction boundary (see [`crate::run_control`]), then
    /// quiesces every device that can be (vfio-user migration RUNNING -> STOP: no DMA
    /// in flight, no interrupt raised). Returns the devices that could not be (no
    /// migration support, or the stop failed): they go on running.
    pub fn pause(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        let _pausers = self.pause_lock();
        self.pause_unlocked()
    }

    /// One snapshot at a time (see the field).
    pub(crate) fn snapshot_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pauser at a time: held across a pause and what is done while paused.
    pub(crate) fn pause_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.pausers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Vm::pause`] for a holder of [`Vm::pause_lock`].
    pub(crate) fn pause_unlocked(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        self.run.pause()?;
        self.events.publish(crate::events::Event::VmPaused);
        let mut unquiesced = Vec::new();
        for d in self.devices() {
            if let Err(e) = self.quiesce(&d) {
                tracing::warn!("pause: {e}");
                unquiesced.push(d.name().to_string());
            }
        }
        // Front-ends that work between exits (virtio-iommu's queue worker) stop after
        // the devices: no request is half-done in a snapshot.
        for fe in self.frontends().all() {
            if let Some(p) = fe.pausable()
                && let Err(e) = p.pause()
            {
                tracing::warn!("pause: front-end {}: {e}", fe.name());
                unquiesced.push(format!("frontend/{}", fe.name()));
            }
        }
        #[cfg(feature = "test-sources")]
        if let Some(t) = self.test_sources()
            && let Err(e) = vm_api::Pausable::pause(t.as_ref())
        {
            tracing::warn!("pause: {e}");
            unquiesced.push("test-sources".to_string());
        }
        // What the devices signalled before they stopped reaches the irqchip before
        // anyone reads the vCPU's local APIC.
        self.irqs.settle();
        Ok(unquiesced)
    }

    /// Stops device `d` (vfio-user migration STOP) until [`Vm::resume`].
    pub(crate) fn quiesce(&self, d: &AssignedDevice) -> std::result::Result<(), String> {
        let mut stopped = self.quiesced.lock().unwrap_or_else(|e| e.into_inner());
        if stopped.iter().any(|n| n == d.name()) {
            return Ok(());
        }
        vm_api::Pausable::pause(d).map_err(|e| e.to_string())?;
        stopped.push(d.name().to_string());
        Ok(())
    }

    /// Lets the quiesced devices and the paused vCPU run again. Returns the devices
    /// that could not run again (STOP -> RUNNING refused or unanswered): each is
    /// declared gone (a surprise removal, counted), since a device left stopped under a
    /// running guest would be a device that silently does nothing.
    pub fn resume(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        let _pausers = self.pause_lock();
        self.resume_unlocked()
    }

    /// [`Vm::resume`] for a holder of [`Vm::pause_lock`].
    pub(crate) fn resume_unlocked(&self) -> std::result::Result<Vec<String>, crate::run_control::RunError> {
        if self.run.state() != crate::run_control::RunState::Paused {
            return Err(crate::run_control::RunError::NotPaused);
        }
        let stopped = std::mem::take(&mut *self.quiesced.lock().unwrap_or_else(|e| e.into_inner()));
        let mut failed = Vec::new();
        for fe in self.frontends().all() {
            if let Some(p) = fe.pausable()
                && let Err(e) = p.resume()
            {
                tracing::error!("resume: front-end {}: {e}", fe.name());
                failed.push(format!("frontend/{}", fe.name()));
            }
        }
        for name in stopped {
            if let Some(d) = self.device(&name)
                && let Err(e) = vm_api::Pausable::resume(d.as_ref())
            {
                tracing::error!("resume: device {name}: {e}");
                d.function().died(&format!("it did not run again after a pause: {e}"));
                self.resume_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                failed.push(name);
            }
        }
        #[cfg(feature = "test-sources")]
        if let Some(t) = self.test_sources() {
            let _ = vm_api::Pausable::resume(t.as_ref());
        }
        self.run.resume()?;
        self.events.publish(crate::events::Event::VmResumed { failed: failed.clone() });
        Ok(failed)
    }

    /// Devices declared gone because they did not run again after a pause.
    pub fn resume_failures(&self) -> u64 {
        self.resume_failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}
