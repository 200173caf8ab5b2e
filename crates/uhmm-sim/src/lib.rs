//! uhmm-sim: a software device for uhmm that behaves like the kernel's
//! `dmirror` test driver (`lib/test_hmm.c`).
//!
//! The device — its page table, mirror commands and device memory — arrives
//! with uhmm's mirroring and device-memory layers. For now this crate builds
//! and names what it will hold.

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
