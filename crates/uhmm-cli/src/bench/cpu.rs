//! The CPU side of the benchmarks: touching and reading memory through
//! plain pointers, as a program would. The one named place with `unsafe`
//! in the CLI: the pointers are to mappings the benchmark made and owns,
//! which nothing else refers into.
#![allow(unsafe_code)]

use uhmm::PAGE_SIZE;
use uhmm::PageRange;

/// Writes one byte in every page of `range` (a first touch faults each in).
pub fn touch_pages(range: PageRange) {
    let base = range.start().as_mut_ptr::<u8>();
    for i in 0..range.npages() {
        // SAFETY: `range` is a writable mapping owned by the benchmark; no
        // reference points into it.
        unsafe { base.add(i * PAGE_SIZE).write_volatile(1) };
    }
}

/// Reads every 8-byte word of `range` and returns their wrapping sum.
pub fn sum(range: PageRange) -> u64 {
    let base = range.start().as_ptr::<u64>();
    let mut acc = 0u64;
    for i in 0..range.len() / 8 {
        // SAFETY: `range` is a readable mapping owned by the benchmark,
        // 8-byte aligned (page aligned), and nothing writes it meanwhile.
        acc = acc.wrapping_add(unsafe { base.add(i).read() });
    }
    acc
}

/// Reads the byte at `addr` (a first touch of a page).
pub fn read_byte(addr: uhmm::VirtAddr) -> u8 {
    // SAFETY: `addr` lies in a readable mapping owned by the benchmark.
    unsafe { addr.as_ptr::<u8>().read_volatile() }
}

/// Pins the calling thread to `cpu` (threads it creates afterwards inherit
/// that); returns whether the kernel agreed.
pub fn pin_to(cpu: usize) -> bool {
    // SAFETY: `set` is a local cpu_set_t initialised by CPU_ZERO; CPU_SET
    // writes inside it; sched_setaffinity(0) changes the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
