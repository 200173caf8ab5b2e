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
//!
//! In the area for whole 2 MiB blocks, a block's shape is tracked too, as
//! a hint for placing THPs: a *flat* block has no page table under its
//! PMD (never used, emptied by `MADV_DONTNEED`, which frees the emptied
//! page table on kernels with `CONFIG_PT_RECLAIM`, or left by a THP that
//! moved out whole), so a THP moved in stays one and a populate there
//! makes one; a block that held 4 KiB pages keeps its emptied page table,
//! and a THP moved into it is split. A dirty block may hold one whole THP.
//! THP traffic takes flat blocks (or THP blocks, to fill), 4 KiB traffic
//! the others first. Nothing is wrong where the hint errs: a THP is split.

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::sys::mem::{self, Advice, Mapping, MemError};
use crate::sys::pagemap::{Categories, Pagemap, ScanQuery};
use crate::sys::uffd::{RegisterError, RegisterMode, Uffd};
use std::sync::Mutex;

/// The block size: a PMD, so THPs keep their alignment.
pub(crate) const BLOCK: usize = 2 << 20;

/// Reserved address space per area (only slots in use are backed).
const AREA: usize = 8 << 30;

/// Dirty blocks kept for reuse (a migration back to system memory fills
/// slots that still hold pages without allocating); beyond this many, a
/// freed dirty run is emptied at once.
const KEEP_DIRTY: usize = 128;

/// Why staging could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The area could not be mapped or registered.
    #[error("cannot set up the staging area: {0}")]
    Map(#[from] MemError),
    /// The area could not be registered with the userfaultfd.
    #[error("cannot register the staging area: {0}")]
    Register(#[from] RegisterError),
    /// Blocks that held pages could not be emptied for reuse.
    #[error("cannot empty staging blocks for reuse: {0}")]
    Empty(MemError),
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

/// What the caller will do with a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Move pages in: every slot must be a hole.
    Empty,
    /// Fill slots and move them out: slots that still hold pages are
    /// welcome (no allocation needed).
    Fill,
    /// As `Fill`, for whole 2 MiB device pages coming home, one for each
    /// block: blocks that hold a THP, or flat ones (a populate there makes
    /// a THP), which then move into place as one each.
    Huge,
}

/// A whole block's state, as the allocation prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Clean, no page table.
    Flat,
    /// Dirty, one whole THP.
    HoldsThp,
    /// Clean, with a page table.
    CleanTable,
    /// Dirty, 4 KiB pages.
    DirtyPages,
}

/// What a block holds once a run's user leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// Every slot a hole. `flat`: no page table under its PMD either
    /// (known: a THP moved out of it whole).
    Empty {
        /// No page table left.
        flat: bool,
    },
    /// One whole THP, mapped by its PMD.
    Thp,
    /// Pages (or it may).
    Pages,
}

impl Left {
    /// Whether the block holds pages (is dirty).
    fn dirty(self) -> bool {
        !matches!(self, Left::Empty { .. })
    }
}

#[derive(Debug)]
struct Area {
    map: Mapping,
    users: Vec<u32>,
    dirty: Vec<bool>,
    /// The shape of each block at rest (see the module's docs); kept as
    /// it was at the allocation while the block is in use. Only the area
    /// for whole blocks uses them.
    flat: Vec<bool>,
    thp: Vec<bool>,
    /// Blocks from here on were never handed out (free, clean, flat).
    used: usize,
    /// A free block below `used` may be flat / hold a THP (false once a
    /// pass found none, until one is freed so).
    maybe_flat: bool,
    maybe_thp: bool,
    /// Blocks that were free (no users) when pushed, by whether they were
    /// dirty then: the one-block allocations (a 4 KiB fault back, a small
    /// migration) pop from these instead of scanning every block. Entries
    /// are checked when popped (a block may have been taken or changed
    /// since), and the lists are rebuilt when they grow past twice the
    /// blocks.
    free_clean: Vec<usize>,
    free_dirty: Vec<usize>,
}

impl Area {
    /// Block `i` is free now, clean or dirty as its flag says: on a list.
    fn push_free(&mut self, i: usize) {
        if self.dirty[i] {
            self.free_dirty.push(i);
        } else {
            self.free_clean.push(i);
        }
        if self.free_clean.len() + self.free_dirty.len() > 2 * self.users.len() {
            self.rebuild_free();
        }
    }

    fn rebuild_free(&mut self) {
        self.free_clean.clear();
        self.free_dirty.clear();
        // Highest first: the lists are stacks, lowest blocks pop first.
        for i in (0..self.users.len()).rev() {
            if self.users[i] == 0 {
                if self.dirty[i] {
                    self.free_dirty.push(i);
                } else {
                    self.free_clean.push(i);
                }
            }
        }
    }

    /// The first of `count` adjacent free blocks of shape `shape`. Flat
    /// and THP blocks are rare once every block has been used: a pass
    /// that found none is not made again until one is freed.
    fn find_shape(&mut self, count: usize, shape: Shape) -> Option<usize> {
        let seen = |a: &Area| match shape {
            Shape::Flat => a.used < a.users.len() || a.maybe_flat,
            Shape::HoldsThp => a.maybe_thp,
            Shape::CleanTable | Shape::DirtyPages => true,
        };
        if !seen(self) {
            return None;
        }
        let found = self.find_run(count, |a, i| match shape {
            Shape::Flat => !a.dirty[i] && a.flat[i],
            Shape::HoldsThp => a.dirty[i] && a.thp[i],
            Shape::CleanTable => !a.dirty[i] && !a.flat[i],
            Shape::DirtyPages => a.dirty[i] && !a.thp[i],
        });
        if found.is_none() && count == 1 {
            match shape {
                Shape::Flat => self.maybe_flat = false,
                Shape::HoldsThp => self.maybe_thp = false,
                Shape::CleanTable | Shape::DirtyPages => {}
            }
        }
        found
    }

    /// The first of `count` adjacent free blocks that `ok` accepts, in
    /// one pass over the blocks ever handed out (and `count` more).
    fn find_run(&self, count: usize, ok: impl Fn(&Area, usize) -> bool) -> Option<usize> {
        let mut len = 0;
        for i in 0..self.users.len().min(self.used + count) {
            if self.users[i] == 0 && ok(self, i) {
                len += 1;
                if len == count {
                    return Some(i + 1 - count);
                }
            } else {
                len = 0;
            }
        }
        None
    }

    /// A free block, dirty (`dirty`) or clean, off its list; `None` if
    /// there is none.
    fn pop_free(&mut self, dirty: bool) -> Option<usize> {
        loop {
            let list = if dirty {
                &mut self.free_dirty
            } else {
                &mut self.free_clean
            };
            let i = list.pop()?;
            if self.users[i] == 0 && self.dirty[i] == dirty {
                return Some(i);
            }
        }
    }
}

#[derive(Debug)]
struct Areas {
    /// For whole 2 MiB blocks: THP allowed.
    huge: Area,
    /// For the rest: 4 KiB pages only (a THP for one page would cost a
    /// 2 MiB allocation, and moving a page out of it a split).
    small: Area,
    dirty_blocks: usize,
}

impl Areas {
    fn area(&mut self, huge: bool) -> &mut Area {
        if huge {
            &mut self.huge
        } else {
            &mut self.small
        }
    }
}

/// The staging area.
#[derive(Debug)]
pub(crate) struct Staging {
    areas: Mutex<Areas>,
    /// Where each area starts (fixed), to compute slots without the lock.
    huge_start: VirtAddr,
    small_start: VirtAddr,
}

/// A run of blocks given to one migration (or exclusive grab) for `range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    huge: bool,
    first: usize,
    count: usize,
    /// The 2 MiB-aligned address the run's first block stands for.
    origin: VirtAddr,
}

fn area(uffd: &Uffd, advice: Advice) -> Result<Area, StagingError> {
    let map = Mapping::builder(AREA)
        .align(BLOCK)
        .noreserve(true)
        .build()?;
    map.advise(map.range(), advice)?;
    // A child has no use for pages in transit (a fork brings every page
    // home first), and a page shared with one could not be moved out of
    // staging any more (UFFDIO_MOVE refuses pages that are not the
    // process's own): the area is not inherited, even by a fork uhmm does
    // not see.
    map.advise(map.range(), Advice::DontFork)?;
    uffd.register(&map, map.range(), RegisterMode::WP)?;
    let n = AREA / BLOCK;
    let mut a = Area {
        map,
        users: vec![0; n],
        dirty: vec![false; n],
        flat: vec![true; n],
        thp: vec![false; n],
        used: 0,
        maybe_flat: false,
        maybe_thp: false,
        free_clean: Vec::new(),
        free_dirty: Vec::new(),
    };
    a.rebuild_free();
    Ok(a)
}

impl Run {
    /// Whether the run is of whole blocks (the area where THPs go).
    pub(crate) fn whole_blocks(&self) -> bool {
        self.huge
    }

    /// The whole address range the run stands for (its blocks).
    pub(crate) fn span(&self) -> PageRange {
        PageRange::new(self.origin, self.count * BLOCK)
            .unwrap_or_else(|_| unreachable!("a run's span is a valid range"))
    }
}

impl Staging {
    /// Maps and registers the areas.
    pub(crate) fn new(uffd: &Uffd) -> Result<Staging, StagingError> {
        let huge = area(uffd, Advice::HugePage)?;
        let small = area(uffd, Advice::NoHugePage)?;
        Ok(Staging {
            huge_start: huge.map.range().start(),
            small_start: small.map.range().start(),
            areas: Mutex::new(Areas {
                huge,
                small,
                dirty_blocks: 0,
            }),
        })
    }

    /// The two areas, as registered.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = PageRange> {
        [self.huge_start, self.small_start]
            .into_iter()
            .filter_map(|start| PageRange::new(start, AREA).ok())
    }

    /// A run for the pages of `range`. `may_clean`: the caller is not the
    /// fault service, so dirty blocks can be emptied. `thp`: THPs are to
    /// move in (`Want::Empty`): flat blocks are wanted.
    pub(crate) fn alloc(
        &self,
        range: PageRange,
        want: Want,
        may_clean: bool,
        thp: bool,
    ) -> Result<Run, StagingError> {
        let huge = range.start().is_aligned(BLOCK) && range.len() % BLOCK == 0;
        let origin = range.start().align_down(BLOCK);
        let span = range.end().get() - origin.get();
        let count = span.div_ceil(BLOCK);
        let full = || StagingError::Full {
            range,
            needed: (count * BLOCK) >> 20,
        };
        let mut guard = crate::mm::lock_poisoned(&self.areas);
        let areas = &mut *guard;
        let a = areas.area(huge);
        let n = a.users.len();
        if count > n {
            return Err(full());
        }
        // First fit, preferring blocks in the state wanted: holes to move
        // pages in, pages to fill (already allocated and warm).
        let fits = |a: &Area, start: usize, dirty_ok: bool, clean_ok: bool| {
            (start..start + count)
                .all(|i| a.users[i] == 0 && (if a.dirty[i] { dirty_ok } else { clean_ok }))
        };
        let (first_pass, second_pass) = match want {
            Want::Empty => ((false, true), (may_clean, true)),
            Want::Fill | Want::Huge => ((true, false), (true, true)),
        };
        let mut found = if huge {
            // Whole blocks: by shape first (see the module's docs), each
            // shape in one pass over the flags; the fallback below takes
            // any block in the state wanted.
            use Shape::*;
            let shapes: &[Shape] = match want {
                Want::Empty if thp => &[Flat],
                Want::Empty => &[CleanTable],
                Want::Huge => &[HoldsThp, Flat, DirtyPages, CleanTable],
                Want::Fill => &[DirtyPages, CleanTable],
            };
            shapes.iter().find_map(|&shape| a.find_shape(count, shape))
        } else {
            None
        };
        for (dirty_ok, clean_ok) in [first_pass, second_pass] {
            if found.is_some() {
                break;
            }
            found = if count == 1 {
                // One block: off the free lists, no scan.
                let mut pick = None;
                for (dirty, ok) in [(true, dirty_ok), (false, clean_ok)] {
                    if pick.is_none() && ok {
                        pick = a.pop_free(dirty);
                    }
                }
                pick
            } else {
                (0..=n - count).find(|&s| fits(a, s, dirty_ok, clean_ok))
            };
        }
        let first = found.ok_or_else(full)?;
        let mut clean = Vec::new();
        a.used = a.used.max(first + count);
        for i in first..first + count {
            a.users[i] = 1;
            if want == Want::Empty && std::mem::take(&mut a.dirty[i]) {
                clean.push(i);
            }
        }
        areas.dirty_blocks -= clean.len().min(areas.dirty_blocks);
        drop(guard);
        let run = Run {
            huge,
            first,
            count,
            origin,
        };
        for i in clean {
            // (Flat now: nothing depends on it while the run is in use.)
            if let Err(e) = self.empty(huge, i, 1) {
                // Pages may be left in a slot the caller would take for
                // empty (a move's answer is checked against what its slot
                // holds): the run goes back as it was.
                self.put_run(run, |_| Left::Pages);
                return Err(StagingError::Empty(e));
            }
        }
        Ok(run)
    }

    fn start(&self, huge: bool) -> VirtAddr {
        if huge {
            self.huge_start
        } else {
            self.small_start
        }
    }

    /// The slot of the page at `addr` (which lies in the run's range).
    pub(crate) fn slot(&self, run: &Run, addr: VirtAddr) -> VirtAddr {
        let offset = addr.get() - run.origin.get();
        VirtAddr::new(self.start(run.huge).get() + run.first * BLOCK + offset)
    }

    /// The slots of `range` (inside the run's range) as one range.
    pub(crate) fn slots(&self, run: &Run, range: PageRange) -> PageRange {
        PageRange::new(self.slot(run, range.start()), range.len())
            .unwrap_or_else(|_| unreachable!("slots of a valid range are a valid range"))
    }

    /// A page number naming the slot at `slot` (for the state table):
    /// small-area pages count from 0, huge-area pages from `AREA / PAGE_SIZE`.
    pub(crate) fn page_number(&self, slot: VirtAddr) -> u64 {
        let (base, extra) =
            if slot >= self.small_start && slot.get() < self.small_start.get() + AREA {
                (self.small_start, 0)
            } else {
                (self.huge_start, AREA / PAGE_SIZE)
            };
        ((slot.get() - base.get()) / PAGE_SIZE + extra) as u64
    }

    /// The slot a page number names.
    pub(crate) fn page_at(&self, number: u64) -> VirtAddr {
        let n = number as usize;
        if n < AREA / PAGE_SIZE {
            VirtAddr::new(self.small_start.get() + n * PAGE_SIZE)
        } else {
            VirtAddr::new(self.huge_start.get() + (n - AREA / PAGE_SIZE) * PAGE_SIZE)
        }
    }

    fn block_of(number: u64) -> (bool, usize) {
        let n = number as usize;
        if n < AREA / PAGE_SIZE {
            (false, n * PAGE_SIZE / BLOCK)
        } else {
            (true, (n - AREA / PAGE_SIZE) * PAGE_SIZE / BLOCK)
        }
    }

    /// One more user of the block holding page `number`.
    pub(crate) fn hold(&self, number: u64) {
        let (huge, block) = Self::block_of(number);
        let mut areas = crate::mm::lock_poisoned(&self.areas);
        let a = areas.area(huge);
        if let Some(u) = a.users.get_mut(block) {
            *u += 1;
        }
    }

    /// Whether `run` (a run in use), freed with its pages left in it,
    /// would keep no more dirty blocks than are worth keeping: then a
    /// migration may leave its pages there (see `MigrateVma::copy_fill`).
    /// A run that was dirty already costs nothing more.
    pub(crate) fn keeps_dirty(&self, run: Option<&Run>) -> bool {
        let Some(run) = run else {
            return false;
        };
        let mut areas = crate::mm::lock_poisoned(&self.areas);
        let kept = areas.dirty_blocks;
        let a = areas.area(run.huge);
        let newly = (run.first..run.first + run.count)
            .filter(|&i| !a.dirty.get(i).copied().unwrap_or(true))
            .count();
        kept + newly <= KEEP_DIRTY
    }

    /// One user less of the block holding page `number`; `dirty`: it may
    /// hold pages.
    pub(crate) fn unhold(&self, number: u64, dirty: bool) {
        let (huge, block) = Self::block_of(number);
        self.put_block(huge, block, dirty);
    }

    /// The run's users leave. `dirty`: pages may remain in it; `may_clean`:
    /// they may be emptied now (not on the fault service), which happens
    /// when more dirty blocks are kept than are worth keeping.
    pub(crate) fn free(&self, run: Run, dirty: bool, may_clean: bool) {
        let left = if dirty {
            Left::Pages
        } else {
            Left::Empty { flat: false }
        };
        self.free_blocks(run, &vec![left; run.count], may_clean);
    }

    /// As [`free`](Self::free), with what each block of the run holds now
    /// (`left[k]` for block `k`; a block past its end holds pages).
    pub(crate) fn free_blocks(&self, run: Run, left: &[Left], may_clean: bool) {
        let held = |k: usize| left.get(k).copied().unwrap_or(Left::Pages);
        let dirty = (0..run.count).any(|k| held(k).dirty());
        let too_many = crate::mm::lock_poisoned(&self.areas).dirty_blocks + run.count > KEEP_DIRTY;
        if dirty && may_clean && too_many && self.empty(run.huge, run.first, run.count).is_ok() {
            self.put_run(run, |_| Left::Empty { flat: true });
        } else {
            self.put_run(run, held);
        }
    }

    /// The run's blocks, one user less each, holding what `held` says.
    fn put_run(&self, run: Run, held: impl Fn(usize) -> Left) {
        let mut guard = crate::mm::lock_poisoned(&self.areas);
        let areas = &mut *guard;
        let a = areas.area(run.huge);
        let (mut newly, mut cleaned) = (0, 0);
        for (k, i) in (run.first..(run.first + run.count).min(a.users.len())).enumerate() {
            a.users[i] = a.users[i].saturating_sub(1);
            let left = held(k);
            let dirty = left.dirty();
            if dirty && !a.dirty[i] {
                a.dirty[i] = true;
                newly += 1;
            } else if !dirty && a.users[i] == 0 && a.dirty[i] {
                a.dirty[i] = false;
                cleaned += 1;
            }
            if a.users[i] == 0 {
                a.flat[i] = left == Left::Empty { flat: true };
                a.thp[i] = left == Left::Thp;
                a.maybe_flat |= a.flat[i];
                a.maybe_thp |= a.thp[i];
                a.push_free(i);
            } else {
                // Shared with pages held exclusive: shape unknown.
                a.flat[i] = false;
                a.thp[i] = false;
            }
        }
        areas.dirty_blocks = areas.dirty_blocks + newly - cleaned.min(areas.dirty_blocks + newly);
    }

    /// What each block of `run` holds now, as the page table says: its
    /// pages, and how many of them in THPs (none where only the
    /// `/proc/self/pagemap` fallback answers, which cannot tell THPs);
    /// `None` if the page table cannot be read.
    pub(crate) fn held(&self, pm: &Pagemap, run: &Run) -> Option<Vec<(usize, usize)>> {
        let slots = self.slots(run, run.span());
        let mut found = Vec::new();
        let plain = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
        let query = plain.report(Categories::PRESENT | Categories::SWAPPED | Categories::HUGE);
        if pm.scan(slots, &query, &mut found).is_err() {
            found.clear();
            pm.scan(slots, &plain, &mut found).ok()?;
        }
        let mut held = vec![(0usize, 0usize); run.count];
        for r in &found {
            for page in r.range.pages() {
                if let Some(h) = held.get_mut((page.get() - slots.start().get()) / BLOCK) {
                    h.0 += 1;
                    if r.categories.contains(Categories::HUGE) {
                        h.1 += 1;
                    }
                }
            }
        }
        Some(held)
    }

    /// Whether block `k` of `run` was flat or held one THP when the run
    /// was taken.
    pub(crate) fn was_thp_shaped(&self, run: &Run, k: usize) -> bool {
        let mut areas = crate::mm::lock_poisoned(&self.areas);
        let a = areas.area(run.huge);
        let i = run.first + k;
        run.huge && (a.flat.get(i) == Some(&true) || a.thp.get(i) == Some(&true))
    }

    /// One user less of block `block`; `dirty`: it may hold pages.
    fn put_block(&self, huge: bool, block: usize, dirty: bool) {
        let mut guard = crate::mm::lock_poisoned(&self.areas);
        let areas = &mut *guard;
        let a = areas.area(huge);
        let Some(users) = a.users.get_mut(block) else {
            return;
        };
        *users = users.saturating_sub(1);
        let free = *users == 0;
        // Pages held one by one went in and out: its shape is unknown.
        a.flat[block] = false;
        a.thp[block] = false;
        if dirty && !a.dirty[block] {
            a.dirty[block] = true;
            areas.dirty_blocks += 1;
        }
        if free {
            areas.area(huge).push_free(block);
        }
    }

    /// Drops the pages of `count` blocks from block `first`. An error
    /// (never seen: a discard of uhmm's own mapping) may leave pages.
    #[allow(unsafe_code)] // named place: uhmm's own staging area
    fn empty(&self, huge: bool, first: usize, count: usize) -> Result<(), MemError> {
        let start = VirtAddr::new(self.start(huge).get() + first * BLOCK);
        let r = PageRange::new(start, count * BLOCK)
            .unwrap_or_else(|_| unreachable!("blocks of the area are a valid range"));
        // SAFETY: the staging area is uhmm's own mapping and no reference
        // into these blocks exists (they have no users but the caller,
        // which has no slice over them).
        unsafe { mem::madvise(r, Advice::DontNeed) }
    }

    /// The page at `slot` as bytes.
    ///
    /// The staging area is uhmm's own mapping, live as long as `self`; a
    /// slot belongs to the one migration that holds its run, which hands
    /// out these slices only while it cannot move pages in or out (they
    /// borrow it).
    #[allow(unsafe_code)] // named place: slices over staging slots
    pub(crate) fn page(&self, slot: VirtAddr) -> &[u8] {
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
                // SAFETY: distinct, page-aligned slots of the live staging
                // mapping held by one migration, which borrows itself
                // mutably for as long as these slices live, so nothing else
                // reads or writes them meanwhile.
                unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr::<u8>(), PAGE_SIZE) }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::uffd::Uffd;

    /// A staging area, or `None` (reported as skipped; where every
    /// capability is required, CI, a failure) without a userfaultfd.
    fn staging() -> Option<Staging> {
        let made = Uffd::builder()
            .open()
            .map_err(|e| e.to_string())
            .and_then(|uffd| {
                let st = Staging::new(&uffd).map_err(|e| e.to_string())?;
                // (The areas stay registered with the closed userfaultfd.)
                drop(uffd);
                Ok(st)
            });
        match made {
            Ok(st) => Some(st),
            Err(e) if std::env::var("UHMM_REQUIRE_ALL").is_ok_and(|v| v == "1") => {
                panic!("required capability missing (CI must not skip): {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: no staging area: {e}");
                None
            }
        }
    }

    /// A one-page range in the 2 MiB block `b` of a made-up address space.
    fn page(b: usize) -> PageRange {
        PageRange::new(VirtAddr::new((1 << 40) + b * BLOCK + PAGE_SIZE), PAGE_SIZE).unwrap()
    }

    #[test]
    fn one_block_runs_come_off_the_free_lists_in_the_state_wanted() {
        let Some(st) = staging() else { return };
        let runs: Vec<Run> = (0..64)
            .map(|b| st.alloc(page(b), Want::Empty, true, false).unwrap())
            .collect();
        let mut blocks: Vec<usize> = runs.iter().map(|r| r.first).collect();
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(blocks.len(), 64, "a block was handed out twice");
        // Half come back dirty, half clean.
        for (k, r) in runs.iter().enumerate() {
            st.free(*r, k % 2 == 0, false);
        }
        let dirty: Vec<usize> = runs.iter().step_by(2).map(|r| r.first).collect();
        // Fill prefers blocks that still hold pages; Empty clean ones.
        let f = st.alloc(page(0), Want::Fill, false, false).unwrap();
        assert!(
            dirty.contains(&f.first),
            "Fill took clean block {}",
            f.first
        );
        let e = st.alloc(page(1), Want::Empty, false, false).unwrap();
        assert!(
            !dirty.contains(&e.first),
            "Empty took dirty block {}",
            e.first
        );
        assert_ne!(f.first, e.first);
        // Multi-block runs (scanned) and one-block runs never share.
        // (Not block-aligned: the small area, as the one-block runs.)
        let big = PageRange::new(VirtAddr::new((1 << 40) + PAGE_SIZE), 2 * BLOCK).unwrap();
        let m = st.alloc(big, Want::Empty, true, false).unwrap();
        assert!(!m.huge && m.count == 3);
        let singles: Vec<Run> = (0..200)
            .map(|b| st.alloc(page(b), Want::Fill, true, false).unwrap())
            .collect();
        for r in &singles {
            assert!(
                r.first < m.first || r.first >= m.first + m.count,
                "block {} is in a live run",
                r.first
            );
            assert!(r.first != f.first && r.first != e.first);
        }
        let mut seen: Vec<usize> = singles.iter().map(|r| r.first).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 200);
    }

    #[test]
    fn whole_blocks_go_where_their_shape_fits() {
        let Some(st) = staging() else { return };
        let block = |b: usize| PageRange::new(VirtAddr::new((1 << 40) + b * BLOCK), BLOCK).unwrap();
        // Never used, every block is flat: the first four (the fallback
        // takes the lowest).
        let runs: Vec<Run> = (0..4)
            .map(|b| st.alloc(block(b), Want::Empty, true, false).unwrap())
            .collect();
        assert!(runs.iter().all(|r| r.whole_blocks()));
        let ids: Vec<usize> = runs.iter().map(|r| r.first).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        // 4 KiB pages went through block 0 (a page table left), a THP
        // stayed in 1, a THP went through 2 whole, 4 KiB pages stayed in 3.
        st.free_blocks(runs[0], &[Left::Empty { flat: false }], true);
        st.free_blocks(runs[1], &[Left::Thp], false);
        st.free_blocks(runs[2], &[Left::Empty { flat: true }], true);
        st.free_blocks(runs[3], &[Left::Pages], false);
        // A THP moving in takes a flat block, not the lowest clean one.
        let t = st.alloc(block(9), Want::Empty, true, true).unwrap();
        assert_eq!(t.first, 2, "a THP moved into a block with a page table");
        st.free_blocks(t, &[Left::Empty { flat: false }], true);
        let t0 = st.alloc(block(9), Want::Empty, true, false).unwrap();
        st.free_blocks(t0, &[Left::Empty { flat: true }], true);
        assert_eq!(t0.first, 0);
        // Block 0 is flat now, 2 is not: 4 KiB pages moving in take 2,
        // keeping the flat block for THPs.
        let e = st.alloc(block(9), Want::Empty, true, false).unwrap();
        assert_eq!(e.first, 2, "4 KiB pages moved into a flat block");
        // 4 KiB device pages coming home fill the block holding 4 KiB
        // pages, not the THP's (a THP moved into a page table splits).
        let f = st.alloc(block(9), Want::Fill, false, false).unwrap();
        assert_eq!(f.first, 3, "4 KiB pages filled into a THP");
        // A 2 MiB device page coming home fills the THP's block...
        let h = st.alloc(block(9), Want::Huge, false, false).unwrap();
        assert_eq!(h.first, 1, "a THP came home through a block without one");
        // ...and the next one a flat block.
        let h2 = st.alloc(block(9), Want::Huge, false, false).unwrap();
        assert_eq!(
            h2.first, 0,
            "a THP came home through a block with a page table"
        );
        // Pages held one by one leave a block's shape unknown: not flat.
        st.free_blocks(h2, &[Left::Empty { flat: true }], true);
        st.hold(st.page_number(st.slot(&h2, block(9).start())));
        st.unhold(st.page_number(st.slot(&h2, block(9).start())), false);
        let t2 = st.alloc(block(9), Want::Empty, true, true).unwrap();
        assert_ne!(
            t2.first, h2.first,
            "a THP moved into a block of unknown shape"
        );
    }

    #[test]
    fn a_dirty_block_is_not_taken_for_moving_in_where_it_cannot_be_emptied() {
        let Some(st) = staging() else { return };
        let n = AREA / BLOCK;
        // Every small block in use, one freed dirty.
        let runs: Vec<Run> = (0..n)
            .map(|b| st.alloc(page(b), Want::Empty, true, false).unwrap())
            .collect();
        st.free(runs[7], true, false);
        assert!(matches!(
            st.alloc(page(0), Want::Empty, false, false),
            Err(StagingError::Full { .. })
        ));
        let r = st.alloc(page(0), Want::Empty, true, false).unwrap();
        assert_eq!(r.first, runs[7].first);
    }

    /// Random allocations, frees (with what each block holds), holds and
    /// unholds against a model of what the blocks hold: a block holding
    /// pages is never handed out for moving pages in (every slot a hole),
    /// never free and clean; `dirty_blocks` counts the dirty flags; every
    /// free block is on the list of its state; nothing at or past `used`
    /// was handed out. The shape hints (flat, THP) may err; these may not.
    #[test]
    #[allow(clippy::needless_range_loop)] // several tables indexed alike
    fn block_bookkeeping_holds_under_random_use() {
        let Some(st) = staging() else { return };
        let mut seed: u64 = 0x1234_5678_9abc_def1;
        let mut rnd = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        use std::collections::HashMap;
        let mut stale: HashMap<(bool, usize), bool> = HashMap::new();
        let mut held: HashMap<(bool, usize), Vec<u64>> = HashMap::new();
        let mut live: Vec<Run> = Vec::new();
        let mut holds_out: Vec<(u64, bool, usize)> = Vec::new();
        for step in 0..4000 {
            match rnd(5) {
                0 | 1 if live.len() < 40 => {
                    let huge = rnd(2) == 0;
                    let blocks = 1 + rnd(3) as usize;
                    let b = rnd(64) as usize;
                    let range = if huge {
                        PageRange::new(VirtAddr::new((1 << 40) + b * BLOCK), blocks * BLOCK)
                            .unwrap()
                    } else {
                        PageRange::new(
                            VirtAddr::new((1 << 40) + b * BLOCK + PAGE_SIZE),
                            (blocks - 1) * BLOCK + PAGE_SIZE,
                        )
                        .unwrap()
                    };
                    let want = [Want::Empty, Want::Fill, Want::Huge][rnd(3) as usize];
                    let may_clean = rnd(2) == 0;
                    let thp = rnd(2) == 0;
                    let before: Vec<bool> = {
                        let mut g = st.areas.lock().unwrap();
                        g.area(huge).dirty.clone()
                    };
                    let Ok(run) = st.alloc(range, want, may_clean, thp) else {
                        continue;
                    };
                    let g = st.areas.lock().unwrap();
                    let a = if huge { &g.huge } else { &g.small };
                    for i in run.first..run.first + run.count {
                        assert_eq!(
                            a.users[i], 1,
                            "step {step}: block {i} handed out while in use"
                        );
                        if want == Want::Empty {
                            if *stale.get(&(huge, i)).unwrap_or(&false) {
                                assert!(
                                    before[i],
                                    "step {step}: block {huge} {i} holding pages handed out clean for Empty"
                                );
                            }
                            assert!(!a.dirty[i]);
                        }
                    }
                    drop(g);
                    if want == Want::Empty {
                        for i in run.first..run.first + run.count {
                            stale.insert((huge, i), false);
                        }
                    } else {
                        // filled: pages in it
                        for i in run.first..run.first + run.count {
                            stale.insert((huge, i), true);
                        }
                    }
                    live.push(run);
                }
                2 if !live.is_empty() => {
                    let run = live.swap_remove(rnd(live.len() as u64) as usize);
                    let left: Vec<Left> = (0..run.count)
                        .map(|_| {
                            [
                                Left::Empty { flat: true },
                                Left::Empty { flat: false },
                                Left::Thp,
                                Left::Pages,
                            ][rnd(4) as usize]
                        })
                        .collect();
                    let may_clean = rnd(2) == 0;
                    let emptied = may_clean
                        && left.iter().any(|l| l.dirty())
                        && st.areas.lock().unwrap().dirty_blocks + run.count > KEEP_DIRTY;
                    for (k, l) in left.iter().enumerate() {
                        stale.insert((run.huge, run.first + k), l.dirty() && !emptied);
                    }
                    st.free_blocks(run, &left, may_clean);
                }
                3 if !live.is_empty() => {
                    let run = live[rnd(live.len() as u64) as usize];
                    let k = rnd(run.count as u64) as usize;
                    let slot = VirtAddr::new(
                        st.start(run.huge).get()
                            + (run.first + k) * BLOCK
                            + PAGE_SIZE * rnd(512) as usize,
                    );
                    let n = st.page_number(slot);
                    st.hold(n);
                    held.entry((run.huge, run.first + k)).or_default().push(n);
                    holds_out.push((n, run.huge, run.first + k));
                }
                4 if !holds_out.is_empty() => {
                    let (n, huge, b) = holds_out.swap_remove(rnd(holds_out.len() as u64) as usize);
                    st.unhold(n, true);
                    stale.insert((huge, b), true);
                    let v = held.get_mut(&(huge, b)).unwrap();
                    let j = v.iter().position(|&x| x == n).unwrap();
                    v.swap_remove(j);
                }
                _ => {}
            }
            // Invariants.
            let g = st.areas.lock().unwrap();
            let mut dirty_count = 0;
            for (huge, a) in [(true, &g.huge), (false, &g.small)] {
                let on_clean: std::collections::HashSet<usize> =
                    a.free_clean.iter().copied().collect();
                let on_dirty: std::collections::HashSet<usize> =
                    a.free_dirty.iter().copied().collect();
                for i in 0..a.users.len() {
                    if a.dirty[i] {
                        dirty_count += 1;
                    }
                    let h = held.get(&(huge, i)).map_or(0, |v| v.len());
                    if a.users[i] == 0 {
                        assert_eq!(h, 0);
                        if *stale.get(&(huge, i)).unwrap_or(&false) {
                            assert!(
                                a.dirty[i],
                                "step {step}: free block {huge} {i} holds pages but is clean"
                            );
                        }
                        let list = if a.dirty[i] { &on_dirty } else { &on_clean };
                        assert!(
                            list.contains(&i),
                            "step {step}: free block {huge} {i} on no list"
                        );
                    }
                    if i >= a.used {
                        assert!(
                            a.users[i] == 0 && !a.dirty[i],
                            "step {step}: block {i} past used"
                        );
                    }
                }
            }
            assert_eq!(g.dirty_blocks, dirty_count, "step {step}: dirty_blocks");
        }
    }
}
