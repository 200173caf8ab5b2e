//! The process address space as devices see it (the kernel's `mm_struct`
//! side of HMM).
//!
//! So far: [`notifier`], the interval notifiers through which a device is
//! told of every change to the ranges it mirrors, and [`Owner`], the
//! identity of a device. `Mm`, managed regions, the fault service and
//! `range_fault` build on them.

pub mod notifier;

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};

/// The identity of a device (the kernel's `pgmap_owner`): invalidations
/// carry the owner that caused them, and device-private pages the owner they
/// belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner(NonZeroU64);

impl Owner {
    /// A new owner, distinct from every other one made in this process.
    pub fn unique() -> Owner {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        // Starting at 1 and counting up, `id` wraps to 0 only after 2^64
        // owners, which cannot be made.
        Owner(NonZeroU64::new(id).unwrap_or(NonZeroU64::MIN))
    }

    /// The owner's number.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}
