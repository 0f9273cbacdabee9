//! The device's own notifications to the VMM: the ERR (error reporting) and REQ
//! (release request) interrupt indexes, when the device offers them. They reach the
//! VMM, not the guest: each one is counted and logged. One thread per function that
//! offers any, stopped (and joined) when the function goes.

use super::backend::VfioDevice;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vfio_user::proto::{self, SetIrqs};
use vmm_sys_util::eventfd::EventFd;

/// Counts of ERR and REQ signals.
#[derive(Debug, Default)]
pub struct Counts {
    /// Error reports.
    pub errors: AtomicU64,
    /// Release requests.
    pub requests: AtomicU64,
}

/// The watcher of one function's ERR and REQ eventfds.
pub struct Notifications {
    counts: Arc<Counts>,
    stop: Option<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notifications {
    /// Wires the indexes `dev` offers (none: nothing runs).
    pub fn start(name: &str, dev: &dyn VfioDevice) -> Result<Notifications, String> {
        let counts = Arc::new(Counts::default());
        let mut fds = Vec::new();
        for index in [proto::PCI_ERR, proto::PCI_REQ] {
            if dev.irq(index).map_or(0, |i| i.count) == 0 {
                continue;
            }
            let fd = irq::eventfd().map_err(|e| format!("eventfd: {e}"))?;
            let flags = proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER;
            dev.set_irqs(SetIrqs { flags, index, start: 0, count: 1 }, &[fd.as_raw_fd()])
                .map_err(|e| format!("setting up IRQ index {index}: {e}"))?;
            fds.push((index, fd));
        }
        if fds.is_empty() {
            return Ok(Notifications { counts, stop: None, thread: None });
        }
        let stop = irq::eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let stop2 = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let (c, name) = (Arc::clone(&counts), name.to_string());
        let thread = std::thread::Builder::new()
            .name("vfu-notify".into())
            .spawn(move || watch(&name, &fds, &stop2, &c))
            .map_err(|e| format!("spawning its notification thread: {e}"))?;
        Ok(Notifications { counts, stop: Some(stop), thread: Some(thread) })
    }

    /// What the device signalled so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

fn watch(name: &str, fds: &[(u32, EventFd)], stop: &EventFd, counts: &Counts) {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|(_, f)| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .chain(std::iter::once(libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 }))
        .collect();
    loop {
        // SAFETY: poll(2) on an array of pollfds that lives across the call.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if polls.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (i, (index, fd)) in fds.iter().enumerate() {
            if polls[i].revents == 0 || fd.read().is_err() {
                continue;
            }
            if *index == proto::PCI_ERR {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("passthru: device {name} reported an error (its ERR interrupt)");
            } else {
                counts.requests.fetch_add(1, Ordering::Relaxed);
                eprintln!("passthru: device {name} asks to be released (its REQ interrupt); detach it to comply");
            }
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            let _ = s.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
