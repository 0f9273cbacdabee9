//! Errors of the VMM itself (configuration, host resources, KVM). Errors a guest can
//! cause are never these: they are statuses returned to the guest.

/// Result of VMM operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device cannot be opened.
    #[error(
        "KVM is not available ({path}: {source}): passthru needs a readable and writable {path} to run a guest. \
         To drive the machine without KVM, use the qtest driver port: `passthru run --accel qtest`"
    )]
    KvmUnavailable {
        /// The device path tried.
        path: String,
        /// Why it failed.
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The requested memory size cannot be used.
    #[error("invalid memory size {size:#x}: {reason}")]
    MemorySize {
        /// Requested bytes.
        size: u64,
        /// Why it is refused, and what to pass instead.
        reason: &'static str,
    },
    /// A memory region overlaps an existing one or is malformed.
    #[error(transparent)]
    Region(#[from] vm_api::memory::MapError),
    /// The guest image is not a loadable ELF.
    #[error("cannot load guest ELF: {0}")]
    Elf(String),
    /// An eventfd or epoll operation failed.
    #[error("eventfd/epoll: {0}")]
    EventFd(#[source] std::io::Error),
    /// A thread could not be spawned.
    #[error("cannot spawn thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A GSI below the first MSI GSI was asked for an MSI route.
    #[error("GSI {0} belongs to the irqchip pins; MSI routes start at GSI {first}", first = abi::layout::IOAPIC_PINS)]
    GsiReserved(u32),
    /// The routing table would exceed what KVM accepts.
    #[error("GSI routing table of {0} entries is too large")]
    TooManyRoutes(usize),
    /// Something was registered twice.
    #[error("{0} already registered")]
    AlreadyRegistered(&'static str),
    /// Something unknown was unregistered.
    #[error("{0} not registered")]
    NotRegistered(&'static str),
    /// Too many guest program arguments.
    #[error("{0} guest arguments given; a guest program takes at most 4 (--guest-arg)")]
    GuestArgs(usize),
    /// An assigned device could not be attached.
    #[error("device {0}: {1}")]
    Device(String, String),
    /// An interrupt source could not be attached.
    #[error("interrupt set-up: {0}")]
    Irq(String),
    /// A bus range could not be set up.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// A hypercall block is taken or misaligned.
    #[error(transparent)]
    HypercallBlock(#[from] vm_api::BlockError),
    /// The vCPU stopped for a reason the VMM cannot continue from.
    #[error("guest stopped: {0}")]
    GuestCrashed(String),
    /// A kernel passthru cannot boot (`--kernel`), and why.
    #[error("--kernel: {0}")]
    Kernel(String),
    /// An I/O error of the VMM (qtest socket, files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot cannot be taken or restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
}
