//! A managed region: memory that uhmm manages, as the program holds it.

use super::Mm;
use crate::addr::{PageRange, VirtAddr};
use crate::sys::mem::{self, Mapping, MemError, Plain};

/// A range of memory managed by an [`Mm`]: registered so that every change
/// to it reaches the interval notifiers. Dropping it stops managing the
/// range, and unmaps it if [`Mm::alloc`] mapped it.
///
/// In a forked child, the inherited copy is the child's own memory, which
/// no `Mm` manages there: reading and writing it work, and dropping it only
/// unmaps the child's copy (if `alloc` mapped it), leaving the parent's
/// region managed.
///
/// Like [`Mapping`], it hands out no references into its memory (devices
/// and migrations change it behind the program's back). Programs reach it
/// safely through volatile accessors — [`load`](Self::load) /
/// [`store`](Self::store) of plain values and
/// [`load_bytes`](Self::load_bytes) / [`store_bytes`](Self::store_bytes)
/// of byte ranges, CPU accesses that fault device-resident pages home like
/// any load or store — or through raw pointers ([`as_ptr`](Self::as_ptr)),
/// and through the kernel ([`read_at`](Self::read_at) /
/// [`write_at`](Self::write_at)).
///
/// ```
/// use uhmm::mm::Mm;
/// use uhmm::sys::mem::Backing;
///
/// let mm = Mm::new()?;
/// let region = mm.alloc(4096, Backing::AnonPrivate)?;
/// region.store::<u64>(8, 42)?;
/// assert_eq!(region.load::<u64>(8)?, 42);
/// region.store_bytes(100, b"hello")?;
/// let mut b = [0u8; 5];
/// region.load_bytes(100, &mut b)?;
/// assert_eq!(&b, b"hello");
/// assert!(region.load::<u64>(4093).is_err()); // past the end
/// assert!(region.load::<u64>(4).is_err()); // misaligned
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ManagedRegion {
    mm: Mm,
    range: PageRange,
    /// Its id in the region table (see `Regions::insert`).
    id: u64,
    mapping: Option<Mapping>,
}

impl ManagedRegion {
    pub(super) fn new(mm: Mm, range: PageRange, id: u64, mapping: Option<Mapping>) -> Self {
        Self {
            mm,
            range,
            id,
            mapping,
        }
    }

    /// The pages managed.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The first byte, as a raw pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.range.start().as_mut_ptr()
    }

    /// The [`Mm`] that manages it.
    pub fn mm(&self) -> &Mm {
        &self.mm
    }

    /// The mapping, if [`Mm::alloc`] made it.
    pub fn mapping(&self) -> Option<&Mapping> {
        self.mapping.as_ref()
    }

    /// Where `len` bytes at `offset` are, if they lie inside the region
    /// and `offset` is a multiple of `align`.
    fn at(&self, offset: usize, len: usize, align: usize) -> Result<VirtAddr, MemError> {
        if super::service::on_service() {
            return Err(MemError::OnFaultService);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.range.len() => {}
            _ => {
                return Err(MemError::OutOfBounds {
                    what: format!("{len} bytes at offset {offset:#x}"),
                    mapping: self.range,
                });
            }
        }
        if offset % align != 0 {
            return Err(MemError::Misaligned { offset, align });
        }
        Ok(VirtAddr::new(self.range.start().get() + offset))
    }

    /// Loads the `T` at `offset` with one volatile CPU access (a page on a
    /// device comes home first, as for any load). Not from the fault
    /// service's own thread (no device callback may touch managed memory).
    ///
    /// # Errors
    ///
    /// [`MemError::OutOfBounds`] if it does not lie inside the region;
    /// [`MemError::Misaligned`] if `offset` is not aligned for `T`;
    /// [`MemError::OnFaultService`] from a device callback on the fault
    /// service. A region made inaccessible (`Mm::mprotect` to none, say)
    /// faults as any access would.
    #[allow(unsafe_code)] // named place: the region's volatile accessors
    pub fn load<T: Plain>(&self, offset: usize) -> Result<T, MemError> {
        let a = self.at(offset, size_of::<T>(), align_of::<T>())?;
        // SAFETY: aligned and inside the region, which stays mapped while
        // it is borrowed (owned, or by `Mm::manage`'s contract).
        Ok(unsafe { mem::volatile_load(a) })
    }

    /// Stores `value` at `offset` with one volatile CPU access (see
    /// [`load`](Self::load)).
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load); a read-only region faults (SIGSEGV), as any
    /// store would.
    #[allow(unsafe_code)] // named place: the region's volatile accessors
    pub fn store<T: Plain>(&self, offset: usize, value: T) -> Result<(), MemError> {
        let a = self.at(offset, size_of::<T>(), align_of::<T>())?;
        // SAFETY: as in `load`; the region hands out no references.
        unsafe { mem::volatile_store(a, value) };
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` with volatile CPU
    /// loads (see [`load`](Self::load)).
    ///
    /// # Errors
    ///
    /// [`MemError::OutOfBounds`] if they do not lie inside the region.
    #[allow(unsafe_code)] // named place: the region's volatile accessors
    pub fn load_bytes(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        let a = self.at(offset, buf.len(), 1)?;
        // SAFETY: inside the region, which stays mapped while borrowed.
        unsafe { mem::volatile_read(a, buf) };
        Ok(())
    }

    /// Copies `buf` to `offset` with volatile CPU stores (see
    /// [`store`](Self::store)).
    ///
    /// # Errors
    ///
    /// [`MemError::OutOfBounds`] if they do not lie inside the region.
    #[allow(unsafe_code)] // named place: the region's volatile accessors
    pub fn store_bytes(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        let a = self.at(offset, buf.len(), 1)?;
        // SAFETY: as in `load_bytes`; the region hands out no references.
        unsafe { mem::volatile_write(a, buf) };
        Ok(())
    }

    /// Copies bytes out of the region (through the kernel, so a page on a
    /// device comes back first).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        match &self.mapping {
            Some(m) => m.read_at(offset, buf),
            None => Err(MemError::NoFile {
                mapping: self.range,
            }),
        }
    }

    /// Copies bytes into the region (through the kernel).
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        match &self.mapping {
            Some(m) => m.write_at(offset, buf),
            None => Err(MemError::NoFile {
                mapping: self.range,
            }),
        }
    }
}

impl Drop for ManagedRegion {
    fn drop(&mut self) {
        self.mm
            .let_go(self.range, Some(self.id), self.mapping.is_some());
        // The mapping (if owned) is unmapped after this, by its own drop.
    }
}
