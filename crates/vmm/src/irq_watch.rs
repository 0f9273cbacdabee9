//! A thread that watches interrupt eventfds and reports each wake-up to a callback:
//! the qtest accelerator's stand-in for KVM irqfds. As KVM's irqfd does, one wake-up
//! is one interrupt however large the eventfd's counter was (a device cannot turn one
//! write of 2^64-2 into as many interrupts).
//!
//! An irqfd is identified by the caller's descriptor number (and GSI), as KVM
//! identifies it by the eventfd itself: every eventfd shares one anonymous inode, so
//! the inode says nothing.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Called with the GSI of an eventfd that was signalled.
pub type IrqCallback = Box<dyn Fn(u32) + Send>;

const STOP_TOKEN: u64 = u64::MAX;

struct Watched {
    /// Our duplicate, read by the thread.
    fd: EventFd,
    /// The caller's descriptor number: the irqfd's identity.
    key: std::os::fd::RawFd,
    gsi: u32,
}

struct Shared {
    epoll: Epoll,
    watched: Mutex<(u64, HashMap<u64, Watched>)>,
}

/// Watches eventfds on a thread of its own; stops and joins it on drop.
pub struct IrqWatcher {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl IrqWatcher {
    /// Starts the watcher thread.
    pub fn new(callback: IrqCallback) -> Result<IrqWatcher> {
        let epoll = Epoll::new().map_err(Error::EventFd)?;
        let stop = irq::eventfd().map_err(Error::EventFd)?;
        epoll
            .ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, STOP_TOKEN))
            .map_err(Error::EventFd)?;
        let shared = Arc::new(Shared { epoll, watched: Mutex::new((0, HashMap::new())) });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("irq-watch".into())
            .spawn(move || watch(&s, &callback))
            .map_err(Error::Thread)?;
        Ok(IrqWatcher { shared, stop, thread: Some(thread) })
    }

    /// Starts reporting signals of `fd` as `gsi`.
    pub fn add(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        let key = fd.as_raw_fd();
        let fd = fd.try_clone().map_err(Error::EventFd)?;
        let mut w = self.shared.watched.lock().unwrap_or_else(|e| e.into_inner());
        if w.1.values().any(|x| x.gsi == gsi && x.key == key) {
            return Err(Error::AlreadyRegistered("irqfd"));
        }
        w.0 += 1;
        let token = w.0;
        self.shared
            .epoll
            .ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
            .map_err(Error::EventFd)?;
        w.1.insert(token, Watched { fd, key, gsi });
        Ok(())
    }

    /// Stops reporting `fd` as `gsi`. Signals pending at that moment are dropped, as
    /// KVM drops them on irqfd deassign.
    pub fn remove(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        let mut w = self.shared.watched.lock().unwrap_or_else(|e| e.into_inner());
        let key = fd.as_raw_fd();
        let token =
            w.1.iter()
                .find(|(_, x)| x.gsi == gsi && x.key == key)
                .map(|(t, _)| *t)
                .ok_or(Error::NotRegistered("irqfd"))?;
        if let Some(x) = w.1.remove(&token) {
            let _ = self.shared.epoll.ctl(ControlOperation::Delete, x.fd.as_raw_fd(), EpollEvent::default());
        }
        Ok(())
    }

    /// Number of eventfds watched.
    pub fn len(&self) -> usize {
        self.shared.watched.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }

    /// True when no eventfd is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn watch(shared: &Shared, callback: &IrqCallback) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("irq watcher: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                return;
            }
            let fired = {
                let w = shared.watched.lock().unwrap_or_else(|e| e.into_inner());
                w.1.get(&ev.data()).and_then(|x| read_count(&x.fd).map(|_| x.gsi))
            };
            if let Some(gsi) = fired {
                callback(gsi);
            }
        }
    }
}

/// Reads an eventfd's counter. Called only after epoll reported it readable, and the
/// watcher is its only reader, so the read does not block.
fn read_count(fd: &EventFd) -> Option<u64> {
    fd.read().ok()
}

impl Drop for IrqWatcher {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
