//! uhmm-sim: a software device for uhmm that behaves like the kernel's
//! `dmirror` test driver (`lib/test_hmm.c`), so that the kernel's
//! `hmm-tests` semantics can be asserted on any machine, CI included.
//!
//! [`SimDevice`] mirrors the process's address space: it keeps its own page
//! table, learns of every change through an interval notifier, and offers
//! dmirror's mirror commands with the same results and counts
//! ([`CmdResult`]: pages copied, device-fault rounds) and the same errors
//! ([`SimError::errno`]: EFAULT, EPERM, ...). Several devices can mirror the
//! same memory. Device memory and migration arrive with uhmm's
//! device-memory layer.
//!
//! ```
//! use uhmm::mm::Mm;
//! use uhmm::sys::mem::{Backing, Prot};
//! use uhmm::PAGE_SIZE;
//! use uhmm_sim::SimDevice;
//!
//! let mm = Mm::new()?;
//! let region = mm.alloc(8 * PAGE_SIZE, Backing::AnonPrivate)?;
//! let (a, b) = (SimDevice::new(&mm), SimDevice::new(&mm));
//! a.write(region.range().start(), &vec![1u8; 8 * PAGE_SIZE])?;
//! let (data, res) = b.read(region.range().start(), 8)?;
//! assert!(data.iter().all(|&x| x == 1));
//! assert_eq!((res.cpages, res.faults), (8, 1));
//!
//! // A protection change through uhmm invalidates both mirrors...
//! mm.mprotect(region.range(), Prot::READ)?;
//! assert_eq!((a.mirrored_pages(), b.mirrored_pages()), (0, 0));
//! // ...and a device write to read-only memory fails as dmirror's does.
//! let e = a.write(region.range().start(), &vec![2u8; PAGE_SIZE]).unwrap_err();
//! assert_eq!(e.errno(), rustix::io::Errno::PERM);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod device;
mod memory;
mod table;

pub use device::{CmdResult, SimDevice, SimError, SimStats};

/// The dmirror protection encoding of a snapshot byte
/// (`HMM_DMIRROR_PROT_*` in `lib/test_hmm_uapi.h`), which `snapshot` will
/// return one of per page.
pub mod prot {
    /// Not mapped on the device.
    pub const NONE: u8 = 0x00;
    /// Read-only.
    pub const READ: u8 = 0x01;
    /// Read-write.
    pub const WRITE: u8 = 0x02;
    /// Mapped by a PMD (huge page).
    pub const PMD: u8 = 0x04;
    /// Mapped by a PUD.
    pub const PUD: u8 = 0x08;
    /// The translation could not be made (HMM_PFN_ERROR).
    pub const ERROR: u8 = 0xff;
    /// The zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private memory of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private memory of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// Device-coherent memory of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// Device-coherent memory of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
}
