//! The VM's event stream: what an operator watches happen (as QMP events or
//! cloud-hypervisor's `--event-monitor`): run-state changes, devices added, removed
//! and gone (with why), interrupt forwarding switched, snapshots and restores, and
//! device DMA faults counted per second.
//!
//! Each event is one JSON line, `{"ts": seconds since the VM started, "event": NAME,
//! ...}`. Subscribers (the control API's `GET /api/v1/events`, `--event-monitor`) get
//! them through bounded queues: publishing never blocks, and a subscriber that does
//! not keep up loses events (counted in [`Events::dropped`]) rather than slow the VM.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Events queued for one subscriber before it loses some.
pub const QUEUE: usize = 4096;

/// One event.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The guest started (a program booted, or a restore went on).
    VmRunning,
    /// The vCPU is paused and the devices stopped.
    VmPaused,
    /// Running again; `failed`: devices that did not run again (now gone).
    VmResumed {
        /// Devices declared gone.
        failed: Vec<String>,
    },
    /// The VM is ending with `status` (a guest exit, `vm.shutdown`, a signal).
    VmStopping {
        /// The exit status passthru ends with.
        status: u8,
    },
    /// A device was attached.
    DeviceAdded {
        /// Its name.
        name: String,
        /// Its PCI address.
        bdf: String,
        /// Its DMA front-end.
        frontend: String,
    },
    /// A device was detached (hot-unplug).
    DeviceRemoved {
        /// Its name.
        name: String,
    },
    /// A device died (a surprise removal).
    DeviceGone {
        /// Its name.
        name: String,
        /// Why.
        why: String,
    },
    /// An interrupt source changed hands.
    IrqMode {
        /// DEVICE/INDEX/SUB.
        source: String,
        /// forwarded or vmm.
        mode: String,
    },
    /// A snapshot started, finished or failed.
    Snapshot {
        /// started, done, failed.
        phase: String,
        /// Its directory.
        dir: String,
        /// Bytes written (done).
        #[serde(skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        /// Why it failed (failed).
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The VM was restored from a snapshot.
    Restored {
        /// Its directory.
        dir: String,
    },
    /// Device DMA refused in the last second (new faults, and the total so far).
    DmaFaults {
        /// New faults over the last second.
        per_second: u64,
        /// Faults so far (devices present).
        total: u64,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    ts: f64,
    #[serde(flatten)]
    event: &'a Event,
}

/// The event stream of one VM.
pub struct Events {
    start: Instant,
    subscribers: Mutex<Vec<SyncSender<String>>>,
    published: AtomicU64,
    dropped: AtomicU64,
    /// The per-second fault counter's thread runs while someone subscribes.
    ticking: Mutex<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    /// A stream with no subscriber.
    pub fn new() -> Events {
        Events {
            start: Instant::now(),
            subscribers: Mutex::new(Vec::new()),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            ticking: Mutex::new(false),
        }
    }

    /// Sends `event` to every subscriber, never blocking: a full queue loses it
    /// (counted), a subscriber gone is forgotten. Costs nothing without subscribers.
    pub fn publish(&self, event: Event) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if subs.is_empty() {
            return;
        }
        let line = Line { ts: self.start.elapsed().as_secs_f64(), event: &event };
        let Ok(text) = serde_json::to_string(&line) else { return };
        self.published.fetch_add(1, Ordering::Relaxed);
        subs.retain(|tx| match tx.try_send(text.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// A new subscriber: the events published from now on, as JSON lines.
    pub fn subscribe(&self) -> Receiver<String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Time since the VM was built.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Events published (to at least one subscriber) and events a full queue lost.
    pub fn counts(&self) -> (u64, u64) {
        (self.published.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }

    /// Starts, if it does not run, the thread (`events-tick`) that publishes
    /// [`Event::DmaFaults`] each second faults grew, from `total()` (None: the VM is
    /// gone); it ends when nobody subscribes any more.
    pub fn tick_faults(self: &Arc<Self>, total: impl Fn() -> Option<u64> + Send + 'static) {
        let mut ticking = self.ticking.lock().unwrap_or_else(|e| e.into_inner());
        if *ticking {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("events-tick".into()).spawn(move || {
            let mut last = total().unwrap_or(0);
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let (Some(events), Some(now)) = (me.upgrade(), total()) else { return };
                if events.subscribers() == 0 {
                    *events.ticking.lock().unwrap_or_else(|e| e.into_inner()) = false;
                    return;
                }
                if now > last {
                    events.publish(Event::DmaFaults { per_second: now - last, total: now });
                }
                last = now;
            }
        });
        *ticking = spawned.is_ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_subscribers_as_json_lines_and_a_slow_one_loses_instead_of_blocking() {
        let e = Events::new();
        e.publish(Event::VmPaused); // nobody listens: nothing queued
        let rx = e.subscribe();
        e.publish(Event::DeviceGone { name: "dma0".into(), why: "killed".into() });
        let line: serde_json::Value = serde_json::from_str(&rx.recv().unwrap()).unwrap();
        assert_eq!(line["event"], "device-gone");
        assert_eq!(line["why"], "killed");
        assert!(line["ts"].as_f64().unwrap() >= 0.0);
        for _ in 0..QUEUE + 10 {
            e.publish(Event::VmPaused);
        }
        assert_eq!(e.counts().1, 10, "the queue holds QUEUE events; the rest are counted lost");
        drop(rx);
        e.publish(Event::VmPaused);
        assert_eq!(e.subscribers(), 0, "a subscriber gone is forgotten");
    }
}
