//! Interrupt descriptor table: 256 vectors, each with a 16-byte assembly stub that
//! saves the caller-saved general registers, calls the handler registered for the
//! vector and returns with `iretq`. SSE registers are not saved: guest code is built
//! without SSE (guest/.cargo/config.toml), so no SSE state is ever live. Exceptions (vectors 0..31) print a report
//! on the error console and end the run with [`abi::EXIT_EXCEPTION`].

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// An interrupt handler; receives its vector. Runs with interrupts disabled.
pub type Handler = fn(u8);

const NO_HANDLER: usize = 0;
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(NO_HANDLER) }; 256];
/// Interrupts that arrived on a vector with no handler.
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);

/// Code segment selector of the VMM's GDT (abi layout: null, code, data).
const KERNEL_CS: u16 = 0x08;

#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

core::arch::global_asm!(
    ".pushsection .text.rt_isr, \"ax\"",
    ".balign 16",
    ".global __rt_isr_stubs",
    "__rt_isr_stubs:",
    ".set rt_vec, 0",
    ".rept 256",
    ".balign 16",
    ".byte 0x68", // push imm32
    ".long rt_vec",
    "jmp __rt_isr_common",
    ".set rt_vec, rt_vec + 1",
    ".endr",
    "__rt_isr_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push rbp",
    "mov rbp, rsp",
    "and rsp, -16",
    "mov rdi, [rbp + 80]", // vector, pushed by the stub
    "lea rsi, [rbp + 88]", // CPU frame (error code first for some exceptions)
    "call __rt_isr_dispatch",
    "mov rsp, rbp",
    "pop rbp",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 8",
    "iretq",
    ".popsection",
);

unsafe extern "C" {
    static __rt_isr_stubs: u8;
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating point",
    "alignment check",
    "machine check",
    "SIMD floating point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Does the CPU push an error code for this exception vector?
const fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

#[unsafe(no_mangle)]
extern "C" fn __rt_isr_dispatch(vector: u64, frame: *const u64) {
    if vector < 32 {
        let (error, rip_at) = if has_error_code(vector) {
            // SAFETY: the CPU pushed the error code then the return frame at `frame`.
            (unsafe { *frame }, 1)
        } else {
            (0, 0)
        };
        // SAFETY: the CPU pushed rip at this slot of the frame.
        let rip = unsafe { *frame.add(rip_at) };
        let cr2: u64;
        // SAFETY: reading cr2 has no side effects.
        unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        crate::eprintln!(
            "guest exception {} ({}) at rip {:#x}, error code {:#x}, cr2 {:#x}",
            vector,
            EXCEPTION_NAMES[vector as usize],
            rip,
            error,
            cr2
        );
        crate::exit(abi::EXIT_EXCEPTION);
    }
    let h = HANDLERS[vector as usize & 0xff].load(Ordering::Acquire);
    if h == NO_HANDLER {
        UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // SAFETY: only `set_handler` stores non-zero values, and it stores `Handler`s.
    let f: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
    f(vector as u8);
}

/// Fills the IDT with the stubs and loads it. Called by the runtime before `main`.
pub fn init() {
    // SAFETY: taking the address of the linker-provided stub table.
    let base = unsafe { &__rt_isr_stubs as *const u8 as u64 };
    // SAFETY: init runs once on the boot CPU before interrupts are enabled; nothing
    // else accesses IDT concurrently.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for v in 0..256u64 {
        let addr = base + 16 * v;
        let low = (addr & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8eu64 << 40) // present, DPL 0, 64-bit interrupt gate
            | ((addr >> 16) & 0xffff) << 48;
        idt.0[2 * v as usize] = low;
        idt.0[2 * v as usize + 1] = addr >> 32;
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer { limit: (256 * 16 - 1) as u16, base: idt.0.as_ptr() as u64 };
    // SAFETY: the IDT is static and fully initialised.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Registers `handler` for `vector` (32..=255).
pub fn set_handler(vector: u8, handler: Handler) {
    assert!(vector >= 32, "vectors below 32 are exceptions");
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

/// Interrupts that arrived on a vector with no handler.
pub fn unexpected() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// Enables interrupts.
#[inline(always)]
pub fn enable() {
    // SAFETY: handlers are installed by init.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
#[inline(always)]
pub fn disable() {
    // SAFETY: cli has no memory effects.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

/// Enables interrupts and halts until one arrives, atomically (the `sti` shadow keeps
/// an interrupt from slipping in between), then disables them again.
#[inline(always)]
pub fn wait() {
    // SAFETY: as above; hlt returns after an interrupt is handled.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
