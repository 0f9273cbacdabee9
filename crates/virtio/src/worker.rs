//! The thread that runs a virtio function's queues: it waits (epoll) for the driver's
//! notifications (the queues' ioeventfds) and for the device's own wake-ups, and runs
//! each queue that has work. It stops on request, at once.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What the worker runs.
pub trait Runner: Send + Sync + 'static {
    /// The queues' notification eventfds, by queue index.
    fn notifiers(&self) -> &[EventFd];
    /// The device's own wake-up (work it found without a notification).
    fn wake(&self) -> &EventFd;
    /// Runs queue `index` (notified), or every queue (`None`: a wake-up).
    fn run(&self, index: Option<u16>);
}

/// A running worker; dropping it stops and joins it.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const STOP: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

impl Worker {
    /// Starts a worker named `name` for `runner`.
    pub fn start(name: &str, runner: Arc<dyn Runner>) -> std::io::Result<Worker> {
        let stop = irq::eventfd()?;
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(stop.as_raw_fd(), STOP)?;
        add(runner.wake().as_raw_fd(), WAKE)?;
        for (i, n) in runner.notifiers().iter().enumerate() {
            add(n.as_raw_fd(), i as u64)?;
        }
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut events = vec![EpollEvent::default(); 8];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio worker: epoll: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    match ev.data() {
                        STOP => {
                            let _ = stop2.read();
                            return;
                        }
                        WAKE => {
                            let _ = runner.wake().read();
                            runner.run(None);
                        }
                        i => {
                            if let Some(fd) = runner.notifiers().get(i as usize) {
                                let _ = fd.read();
                            }
                            runner.run(u16::try_from(i).ok());
                        }
                    }
                }
            }
        })?;
        Ok(Worker { stop, thread: Some(thread) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
