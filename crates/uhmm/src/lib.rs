//! uhmm: Heterogeneous Memory Management for Linux userspace.
//!
//! The kernel's HMM lets a device share a process's address space: the
//! device mirrors the CPU page table and is told of every change, and pages
//! can move into device memory with any CPU touch bringing them back. uhmm
//! delivers that model in userspace, on real kernel interfaces: userfaultfd,
//! `/proc/self/pagemap` with `PAGEMAP_SCAN`, `PROCMAP_QUERY`, madvise, memfd.
//!
//! The crate is built in layers, each using only the ones below it (see
//! `DESIGN.md` in the repository):
//!
//! - [`sys`]: the kernel-interface layer — the only place with raw syscalls,
//!   ioctls and `unsafe`, but for a few named places: `Mm::manage` (an
//!   `unsafe fn`: the caller vouches for memory it already has),
//!   `Mm::mprotect`, `ManagedRegion`'s volatile accessors (bounds- and
//!   alignment-checked loads and stores of plain data), the fault
//!   service's own moves and discards of managed memory (safe, because
//!   managed memory has no references into it), and the slices over
//!   uhmm's staging slots that migrations hand to copy engines.
//! - [`addr`]: address newtypes ([`VirtAddr`], [`PageRange`]) used by every
//!   layer.
//! - [`mm`]: the address space as devices see it: [`mm::Mm`] (the
//!   userfaultfd, the fault service, managed regions and their page
//!   states), interval notifiers ([`mm::notifier`]) and
//!   [`range_fault`](mm::range).
//! - [`devmem`]: device memory: [`devmem::DevicePagemap`] (device pages and
//!   the device's `page_free` / `migrate_to_ram`), [`devmem::MigrateVma`]
//!   (setup / pages / finalize), copy engines ([`devmem::copy`]), and
//!   `Mm::make_device_exclusive`. A CPU touch of a device page is served by
//!   the fault service, which calls the owner back.
//!
//! The software device `uhmm-sim` shows a complete device on the public API.
//!
//! ```
//! use uhmm::sys::mem::Mapping;
//! use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
//! use uhmm::PAGE_SIZE;
//!
//! // Map 8 pages, touch 3 of them, and ask the page table which are present.
//! let map = Mapping::anon(8 * PAGE_SIZE)?;
//! map.write_at(0, &[7u8; 3 * PAGE_SIZE])?;
//! let mut regions = Vec::new();
//! Pagemap::open()?.scan(map.range(), &ScanQuery::new().require(Categories::PRESENT), &mut regions)?;
//! assert_eq!(regions.iter().map(|r| r.range.npages()).sum::<usize>(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod addr;
pub mod devmem;
pub mod mm;
pub mod record;
pub mod sys;
#[doc(hidden)]
pub mod testing;
pub mod trace;

pub use addr::{DevicePfn, PAGE_SHIFT, PAGE_SIZE, PageRange, RangeError, VirtAddr};
