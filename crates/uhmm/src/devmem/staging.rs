//! The staging area: uhmm's own memory for pages in transit.
//!
//! A page leaving the CPU page table for a migration, or held for a
//! device's exclusive access, is moved (`UFFDIO_MOVE`, no copy) into a slot
//! of this area; a page coming back from a device is written here and then
//! moved into place. The area is one large private anonymous mapping,
//! reserved but backed only where slots are in use, registered with the
//! address space's userfaultfd (MOVE needs both ends registered with the
//! same one) in write-protect mode only, so that touching a hole in it
//! never raises a fault the service would have to serve.
//!
//! Slots come in runs of 2 MiB blocks, and a page keeps its offset within
//! its 2 MiB block, so that a THP moves whole and a populated slot can be a
//! THP. Blocks are counted by their users (a migration holds its run; each
//! page held exclusive holds its block); a block whose last user left while
//! pages were still in it is *dirty* and is emptied (`MADV_DONTNEED`)
//! before it is used again — never by the fault service, which must not
//! raise a userfaultfd event it would then wait for itself.

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::sys::mem::{self, Advice, Mapping, MemError};
use crate::sys::uffd::{RegisterError, RegisterMode, Uffd};
use std::sync::Mutex;

/// The block size: a PMD, so THPs keep their alignment.
pub(crate) const BLOCK: usize = 2 << 20;

/// Reserved address space (only slots in use are backed).
const AREA: usize = 16 << 30;

/// Why staging could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The area could not be mapped or registered.
    #[error("cannot set up the staging area: {0}")]
    Map(#[from] MemError),
    /// The area could not be registered with the userfaultfd.
    #[error("cannot register the staging area: {0}")]
    Register(#[from] RegisterError),
    /// Not enough free staging for the range at once.
    #[error(
        "{range} needs {needed} MiB of staging at once, more than is free; migrate it in smaller parts"
    )]
    Full {
        /// The range asked for.
        range: PageRange,
        /// MiB needed.
        needed: usize,
    },
}

#[derive(Debug)]
struct Blocks {
    users: Vec<u32>,
    dirty: Vec<bool>,
    /// Where the next search starts.
    hint: usize,
}

/// The staging area.
#[derive(Debug)]
pub(crate) struct Staging {
    map: Mapping,
    blocks: Mutex<Blocks>,
}

/// A run of blocks given to one migration (or exclusive grab) for `range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    first: usize,
    count: usize,
    /// The 2 MiB-aligned address the run's first block stands for.
    origin: VirtAddr,
}

impl Staging {
    /// Maps and registers the area.
    pub(crate) fn new(uffd: &Uffd) -> Result<Staging, StagingError> {
        let map = Mapping::builder(AREA)
            .align(BLOCK)
            .noreserve(true)
            .build()?;
        map.advise(map.range(), Advice::HugePage)?;
        uffd.register(&map, map.range(), RegisterMode::WP)?;
        let n = AREA / BLOCK;
        Ok(Staging {
            map,
            blocks: Mutex::new(Blocks {
                users: vec![0; n],
                dirty: vec![false; n],
                hint: 0,
            }),
        })
    }

    /// A run of empty blocks for the pages of `range`. `may_clean`: the
    /// caller is not the fault service, so dirty blocks can be emptied.
    pub(crate) fn alloc(&self, range: PageRange, may_clean: bool) -> Result<Run, StagingError> {
        let origin = range.start().align_down(BLOCK);
        let span = range.end().get() - origin.get();
        let count = span.div_ceil(BLOCK);
        let full = || StagingError::Full {
            range,
            needed: (count * BLOCK) >> 20,
        };
        let mut b = crate::mm::lock_poisoned(&self.blocks);
        let n = b.users.len();
        if count > n {
            return Err(full());
        }
        let usable = |b: &Blocks, i: usize| b.users[i] == 0 && (may_clean || !b.dirty[i]);
        let mut found = None;
        for k in 0..n {
            let start = (b.hint + k) % n;
            if start + count > n {
                continue;
            }
            if (start..start + count).all(|i| usable(&b, i)) {
                found = Some(start);
                break;
            }
        }
        let first = found.ok_or_else(full)?;
        let mut clean = Vec::new();
        for i in first..first + count {
            b.users[i] = 1;
            if std::mem::take(&mut b.dirty[i]) {
                clean.push(i);
            }
        }
        b.hint = (first + count) % n;
        drop(b);
        for i in clean {
            self.empty(i, 1);
        }
        Ok(Run {
            first,
            count,
            origin,
        })
    }

    /// The slot of the page at `addr` (which lies in the run's range).
    pub(crate) fn slot(&self, run: &Run, addr: VirtAddr) -> VirtAddr {
        let offset = addr.get() - run.origin.get();
        VirtAddr::new(self.map.range().start().get() + run.first * BLOCK + offset)
    }

    /// The slots of `range` (inside the run's range) as one range.
    pub(crate) fn slots(&self, run: &Run, range: PageRange) -> PageRange {
        PageRange::new(self.slot(run, range.start()), range.len())
            .unwrap_or_else(|_| unreachable!("slots of a valid range are a valid range"))
    }

    /// A page number naming the slot at `slot` (for the state table).
    pub(crate) fn page_number(&self, slot: VirtAddr) -> u64 {
        ((slot.get() - self.map.range().start().get()) / PAGE_SIZE) as u64
    }

    /// The slot a page number names.
    pub(crate) fn page_at(&self, number: u64) -> VirtAddr {
        VirtAddr::new(self.map.range().start().get() + number as usize * PAGE_SIZE)
    }

    /// One more user of the block holding page `number`.
    pub(crate) fn hold(&self, number: u64) {
        let block = number as usize * PAGE_SIZE / BLOCK;
        let mut b = crate::mm::lock_poisoned(&self.blocks);
        if let Some(u) = b.users.get_mut(block) {
            *u += 1;
        }
    }

    /// One user less of the block holding page `number`; `dirty`: it may
    /// hold pages.
    pub(crate) fn unhold(&self, number: u64, dirty: bool) {
        let block = number as usize * PAGE_SIZE / BLOCK;
        self.put_blocks(block, 1, dirty);
    }

    /// The run's users leave. `dirty`: pages may remain in it; `may_clean`:
    /// empty them now (not on the fault service).
    pub(crate) fn free(&self, run: Run, dirty: bool, may_clean: bool) {
        if dirty && may_clean {
            self.empty(run.first, run.count);
            self.put_blocks(run.first, run.count, false);
        } else {
            self.put_blocks(run.first, run.count, dirty);
        }
    }

    fn put_blocks(&self, first: usize, count: usize, dirty: bool) {
        let mut b = crate::mm::lock_poisoned(&self.blocks);
        for i in first..(first + count).min(b.users.len()) {
            b.users[i] = b.users[i].saturating_sub(1);
            b.dirty[i] |= dirty;
        }
    }

    #[allow(unsafe_code)] // named place: uhmm's own staging area
    fn empty(&self, first: usize, count: usize) {
        let start = VirtAddr::new(self.map.range().start().get() + first * BLOCK);
        if let Ok(r) = PageRange::new(start, count * BLOCK) {
            // SAFETY: the staging area is uhmm's own mapping and no
            // reference into these blocks exists (they have no users).
            // Failure leaves pages behind, which MOVE into the slot then
            // reports as EEXIST; the migration does not take those pages.
            let _ = unsafe { mem::madvise(r, Advice::DontNeed) };
        }
    }

    /// The page at `slot` as bytes.
    ///
    /// The staging area is uhmm's own mapping, live as long as `self`; a
    /// slot belongs to the one migration that holds its run, which hands
    /// out these slices only while it cannot move pages in or out (they
    /// borrow it).
    #[allow(unsafe_code)] // named place: slices over staging slots
    pub(crate) fn page(&self, slot: VirtAddr) -> &[u8] {
        debug_assert!(self.map.range().contains(slot));
        // SAFETY: see above: the slot lies in the live staging mapping and
        // nothing writes it while the slice lives.
        unsafe { std::slice::from_raw_parts(slot.as_ptr::<u8>(), PAGE_SIZE) }
    }

    /// The pages at `slots` as mutable bytes, one slice per slot; the
    /// slots must be distinct.
    #[allow(unsafe_code)] // named place: slices over staging slots
    #[allow(clippy::mut_from_ref)] // disjoint slots of uhmm's own area
    pub(crate) fn pages_mut(&self, slots: &[VirtAddr]) -> Vec<&mut [u8]> {
        debug_assert!(slots.windows(2).all(|w| w[0] < w[1]));
        slots
            .iter()
            .map(|&s| {
                debug_assert!(self.map.range().contains(s));
                // SAFETY: distinct, page-aligned slots of the live staging
                // mapping held by one migration, which borrows itself
                // mutably for as long as these slices live, so nothing else
                // reads or writes them meanwhile.
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr::<u8>(), PAGE_SIZE) }
            })
            .collect()
    }
}
