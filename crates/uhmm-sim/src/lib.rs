//! uhmm-sim: a software device for uhmm that behaves like the kernel's
//! `dmirror` test driver (`lib/test_hmm.c`), so that the kernel's
//! `hmm-tests` semantics can be asserted on any machine, CI included.
//!
//! [`SimDevice`] mirrors the process's address space: it keeps its own page
//! table, learns of every change through an interval notifier, and offers
//! dmirror's mirror commands with the same results and counts
//! ([`CmdResult`]: pages copied, device-fault rounds) and the same errors
//! ([`SimError::errno`]: EFAULT, EPERM, ...). Several devices can mirror the
//! same memory.
//!
//! Each device also has device memory (a host arena the CPU does not map,
//! behind a [`uhmm::devmem::DevicePagemap`]): `migrate_to_device` moves
//! pages there, any CPU touch brings them back, `migrate_to_system` and
//! `release` bring them home, `exclusive` holds pages for device atomics
//! until the CPU touches them; `fail_next_alloc` and `set_copy_engine`
//! inject failures.
//!
//! ```
//! use uhmm::mm::{Mm, PageState};
//! use uhmm::sys::mem::Backing;
//! use uhmm::PAGE_SIZE;
//! use uhmm_sim::SimDevice;
//!
//! let mm = Mm::new()?;
//! let region = mm.alloc(16 * PAGE_SIZE, Backing::AnonPrivate)?;
//! region.write_at(0, b"lives on the device")?;
//! let dev = SimDevice::new(&mm);
//! let (data, res) = dev.migrate_to_device(region.range().start(), 16)?;
//! assert_eq!(res.cpages, 16);
//! assert_eq!(&data[..19], b"lives on the device");
//! assert!(matches!(mm.page_state(region.range().start())?, PageState::Device { .. }));
//! // The CPU reads it through a plain pointer: the page faults back.
//! // SAFETY: the region is mapped and readable; no reference points into it.
//! let first = unsafe { region.as_ptr().read_volatile() };
//! assert_eq!(first, b'l');
//! assert_eq!(mm.page_state(region.range().start())?, PageState::System);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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
