//! A managed region: memory that uhmm manages, as the program holds it.

use super::Mm;
use crate::addr::PageRange;
use crate::sys::mem::{Mapping, MemError};

/// A range of memory managed by an [`Mm`]: registered so that every change
/// to it reaches the interval notifiers. Dropping it stops managing the
/// range, and unmaps it if [`Mm::alloc`] mapped it.
///
/// In a forked child, the inherited copy is the child's own memory, which
/// no `Mm` manages there: reading and writing it work, and dropping it only
/// unmaps the child's copy (if `alloc` mapped it), leaving the parent's
/// region managed.
///
/// Like [`Mapping`], it hands out no references into its memory: programs
/// reach it through raw pointers ([`as_ptr`](Self::as_ptr)), devices
/// through their accessors, and tests through
/// [`read_at`](Self::read_at)/[`write_at`](Self::write_at).
#[derive(Debug)]
pub struct ManagedRegion {
    mm: Mm,
    range: PageRange,
    mapping: Option<Mapping>,
}

impl ManagedRegion {
    pub(super) fn new(mm: Mm, range: PageRange, mapping: Option<Mapping>) -> Self {
        Self { mm, range, mapping }
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
        self.mm.unregister(self.range, self.mapping.is_some());
        // The mapping (if owned) is unmapped after this, by its own drop.
    }
}
