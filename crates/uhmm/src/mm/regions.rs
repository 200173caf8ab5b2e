//! The table of managed regions: which ranges of the address space uhmm
//! manages, and the state of their pages, kept in step with munmap, mremap
//! and discards as the events report them.

use super::Owner;
use super::state::{OpId, StateError, StateTable, Stored};
use crate::addr::{DevicePfn, PageRange, VirtAddr};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One managed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub(crate) range: PageRange,
    /// Which mapping it is: a region dropped and mapped anew at the same
    /// place is another region (its pieces after a partial unmap, or its
    /// range after an mremap, are still this one).
    pub(crate) id: u64,
    /// Registered for MISSING faults too (device memory or exclusive
    /// access has been used in it).
    pub(crate) armed: bool,
    /// How often it was moved (mremap events applied): a region moved away
    /// and back is at the same range, but not the same as before.
    pub(crate) moves: u32,
}

/// A range being let go of (a region dropped, or a range unmanaged): no
/// new migration selects its system pages, and no exclusive grab starts
/// there, until it is gone from the table.
#[derive(Debug, Clone, Copy)]
struct Closing {
    token: u64,
    range: PageRange,
    /// Only the pieces of this region (a `ManagedRegion` dropped); every
    /// region in `range` if `None` (`Mm::unmanage`).
    region: Option<u64>,
}

/// An operation in flight on managed pages (a migration, an exclusive grab
/// or revoke): the kernel would hold `mmap_lock` across it; uhmm records it
/// here, under the same lock as the page states, and every structural
/// change the service learns of is applied to it.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) owner: Owner,
    /// The range it was set up on.
    pub(crate) range: PageRange,
    /// What happened to its range since it began, in order.
    changes: Vec<Change>,
    /// Pages (by their address at setup) it is making the process's own
    /// with a write fault, outside the lock: no other operation takes them
    /// meanwhile (see [`Regions::keep`]).
    kept: Vec<VirtAddr>,
    /// The thread that set it up: a CPU fault of that thread on one of its
    /// pages waits for an operation only that thread can end.
    pub(crate) thread: u32,
    /// Whether that self-deadlock has been reported.
    pub(crate) deadlock_reported: bool,
    /// When the service woke that thread at a fault of it on a page of
    /// this operation (the service's read count then): only a fault read
    /// after that wake shows the thread waiting (see `fault::serve`).
    pub(crate) probed: Option<u64>,
    /// A migration (it passed the fork gate, and leaves it when it ends).
    pub(crate) gated: bool,
    /// Inside `MigrateVma::pages`: it is committing, and must not be
    /// reclaimed until that ends.
    pub(crate) committing: bool,
    /// For each page of `range` (by index) that it took out of the CPU's
    /// hands, where the page waits: what anyone may use to put it back
    /// should the operation be abandoned (see `Shared::reclaim_ops`).
    pub(crate) taken: Vec<Option<Taken>>,
}

/// Where a page an operation has taken waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Its data is at this address (a staging slot, or device memory that
    /// is host RAM): it goes back by a move (or a copy).
    At(VirtAddr),
    /// Still mapped, write-protected.
    Mapped,
    /// A device page of the operation's owner.
    Device(DevicePfn),
}

/// A change of the layout under an operation.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// An mremap moved `old` to start at the address.
    Moved(PageRange, VirtAddr),
    /// The range was unmapped (or unmanaged): whatever is there later is
    /// other memory.
    Gone(PageRange),
}

impl Op {
    /// Where the page set up at `addr` is now (after the mremaps since),
    /// or `None` if it was unmapped meanwhile: the address may mean other
    /// memory now, which the operation must not touch.
    pub(crate) fn follow(&self, mut addr: VirtAddr) -> Option<VirtAddr> {
        for change in &self.changes {
            match *change {
                Change::Moved(old, to) if old.contains(addr) => {
                    addr = VirtAddr::new(to.get() + (addr.get() - old.start().get()));
                }
                Change::Gone(r) if r.contains(addr) => return None,
                _ => {}
            }
        }
        Some(addr)
    }

    /// Whether its pages may lie in `range` now.
    fn touches(&self, range: PageRange) -> bool {
        self.range.overlaps(range)
            || self.changes.iter().any(|c| match *c {
                Change::Moved(old, to) => {
                    PageRange::new(to, old.len()).is_ok_and(|r| r.overlaps(range))
                }
                Change::Gone(_) => false,
            })
    }
}

/// Managed ranges by start address (they never overlap), the stored states
/// of their pages, and the operations in flight on them. All three change
/// together, under one lock, and the fault service reads and applies the
/// kernel's events under that lock too: whoever holds it sees the states,
/// the operations and the page table agree (see `service`).
#[derive(Debug, Default)]
pub(crate) struct Regions {
    by_start: BTreeMap<VirtAddr, Region>,
    pub(crate) states: StateTable,
    ops: BTreeMap<OpId, Op>,
    next_op: u64,
    next_region: u64,
    /// Pages a discard is about to zap (see [`fence`](Self::fence)).
    fences: Vec<(PageRange, Instant)>,
    /// Ranges being let go of (see [`close`](Self::close)).
    closing: Vec<Closing>,
    next_closing: u64,
    /// The fault the service is bringing back from its device now (see
    /// `fault::serve`).
    pub(crate) serving: Option<Serving>,
    /// Parts of mappings registered with the userfaultfd that no region
    /// manages (any more): their registrations are to go, at a moment no
    /// layout change is pending (`Shared::unregister_stale`). Kept in step
    /// with the events as the regions are: an unmap takes a part out, an
    /// mremap moves it.
    stale: Vec<PageRange>,
}

/// The page whose fault the service is bringing back from its device, and
/// what installs (any thread's, under the regions lock) did meanwhile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serving {
    pub(crate) page: VirtAddr,
    /// One put it in place: the fault is served, whatever the page holds
    /// once the device's call returns.
    pub(crate) installed: bool,
    /// One was refused by a pending layout change (EAGAIN): a page still
    /// on the device then is not the device's failure.
    pub(crate) refused: bool,
}

impl Serving {
    pub(crate) fn new(page: VirtAddr) -> Self {
        Self {
            page,
            installed: false,
            refused: false,
        }
    }
}

/// Moves what of `ranges` lies in `old` to where an mremap of `old` to
/// `to` put it (the rest stays).
pub(crate) fn follow_move(ranges: &mut Vec<PageRange>, old: PageRange, to: VirtAddr) {
    if !ranges.iter().any(|r| r.overlaps(old)) {
        return;
    }
    let mut now = Vec::with_capacity(ranges.len() + 1);
    for r in std::mem::take(ranges) {
        if let Some(part) = r.intersection(old)
            && let Some(at) = to.checked_add(part.start().get() - old.start().get())
            && let Ok(moved) = PageRange::new(at, part.len())
        {
            now.push(moved);
        }
        now.extend(r.outside([old]));
    }
    *ranges = now;
}

/// How long a fence stands at most. The kernel zaps right after the
/// discarding thread is released; a fence is normally lifted as soon as its
/// pages are seen gone, and this bound only retires the fences of pages the
/// CPU filled again without a fault reaching uhmm (a region not yet armed).
pub(crate) const FENCE_TTL: Duration = Duration::from_secs(1);

/// How many parts of stale registrations wait at most (see
/// [`Regions::add_stale`]).
pub(crate) const MAX_STALE: usize = 1024;

impl Regions {
    /// The managed range that overlaps `range`, if any.
    pub(crate) fn overlapping(&self, range: PageRange) -> Option<PageRange> {
        self.by_start
            .range(..range.end())
            .next_back()
            .map(|(_, r)| r.range)
            .filter(|r| r.overlaps(range))
    }

    /// The one managed region that contains all of `range`.
    pub(crate) fn containing(&self, range: PageRange) -> Option<Region> {
        self.by_start
            .range(..=range.start())
            .next_back()
            .map(|(_, &r)| r)
            .filter(|r| r.range.contains_range(range))
    }

    /// Marks the managed range starting at `start` armed.
    pub(crate) fn arm(&mut self, start: VirtAddr) {
        if let Some(r) = self.by_start.get_mut(&start) {
            r.armed = true;
        }
    }

    /// Marks the pieces of `region` (of every region if `None`) inside
    /// `range` as being let go of, until [`reopen`](Self::reopen) with the
    /// token returned. Each caller lifts only its own mark: two of them
    /// over the same range (a region dropped while a part of it is
    /// unmanaged) do not lift each other's.
    pub(crate) fn close(&mut self, range: PageRange, region: Option<u64>) -> u64 {
        self.next_closing += 1;
        self.closing.push(Closing {
            token: self.next_closing,
            range,
            region,
        });
        self.next_closing
    }

    /// Lifts the mark [`close`](Self::close) returned `token` for.
    pub(crate) fn reopen(&mut self, token: u64) {
        self.closing.retain(|c| c.token != token);
    }

    /// Whether `range`, a part of region `region`, is being let go of.
    pub(crate) fn closing(&self, region: u64, range: PageRange) -> bool {
        self.closing
            .iter()
            .any(|c| c.range.overlaps(range) && c.region.is_none_or(|id| id == region))
    }

    /// The parts inside `within` of the pieces of `region` (of every
    /// region if `None`).
    pub(crate) fn pieces(&self, within: PageRange, region: Option<u64>) -> Vec<PageRange> {
        self.by_start
            .range(..within.end())
            .map(|(_, r)| r)
            .filter(|r| region.is_none_or(|id| id == r.id))
            .filter_map(|r| r.range.intersection(within))
            .collect()
    }

    /// Whether `range` lies entirely inside managed ranges.
    pub(crate) fn covers(&self, range: PageRange) -> bool {
        let mut cursor = range.start();
        for (_, r) in self.by_start.range(..range.end()) {
            let r = r.range;
            if r.end() <= cursor {
                continue;
            }
            if r.start() > cursor {
                return false;
            }
            cursor = r.end();
        }
        cursor >= range.end()
    }

    /// Records `range` as a new managed region; returns its id.
    pub(crate) fn insert(&mut self, range: PageRange) -> u64 {
        self.next_region += 1;
        let region = Region {
            range,
            id: self.next_region,
            armed: false,
            moves: 0,
        };
        self.by_start.insert(range.start(), region);
        self.next_region
    }

    /// `range` as a piece of `of` (split by an unmap, or moved).
    fn insert_as(&mut self, range: PageRange, of: Region) {
        self.by_start.insert(range.start(), Region { range, ..of });
    }

    /// Removes whatever lies in `gone` (an unmap), splitting ranges it cuts.
    /// The stored states of its pages are handed to `gone`; a page some
    /// operation had in flight is no longer its own.
    pub(crate) fn unmapped(&mut self, gone: PageRange, states: impl FnMut(VirtAddr, Stored)) {
        if self.stale.iter().any(|s| s.overlaps(gone)) {
            self.stale = std::mem::take(&mut self.stale)
                .into_iter()
                .flat_map(|s| s.outside([gone]))
                .collect();
        }
        self.states.clear(gone, states);
        self.unfence(gone);
        self.remove_ranges(gone);
        for op in self.ops.values_mut() {
            if op.touches(gone) {
                op.changes.push(Change::Gone(gone));
            }
        }
    }

    /// Takes `gone` out of the managed ranges, splitting ranges it cuts.
    fn remove_ranges(&mut self, gone: PageRange) {
        let hit: Vec<Region> = self
            .by_start
            .values()
            .copied()
            .filter(|r| r.range.overlaps(gone))
            .collect();
        for r in hit {
            self.by_start.remove(&r.range.start());
            if let Ok(head) = PageRange::from_bounds(r.range.start(), gone.start()) {
                self.insert_as(head, r);
            }
            if let Ok(tail) = PageRange::from_bounds(gone.end(), r.range.end()) {
                self.insert_as(tail, r);
            }
        }
    }

    /// Moves what lies in `old` to start at `to` (an mremap), with the
    /// states of its pages; operations in flight follow their pages.
    /// The states of pages replaced at the destination go to `gone`.
    pub(crate) fn moved(
        &mut self,
        old: PageRange,
        to: VirtAddr,
        mut gone: impl FnMut(VirtAddr, Stored),
    ) {
        let was = self
            .overlapping(old)
            .and_then(|r| self.by_start.get(&r.start()))
            .copied();
        let Ok(new) = PageRange::new(to, old.len()) else {
            self.unmapped(old, gone);
            return;
        };
        // Whatever was at the destination was replaced.
        self.unmapped(new, &mut gone);
        self.states.move_range(old, to);
        follow_move(&mut self.stale, old, to);
        self.unfence(old);
        self.remove_ranges(old);
        if let Some(was) = was {
            let moved = Region {
                moves: was.moves.wrapping_add(1),
                ..was
            };
            self.insert_as(new, moved);
        }
        for op in self.ops.values_mut() {
            if op.touches(old) {
                op.changes.push(Change::Moved(old, to));
            }
        }
    }

    /// Fences the present pages `pages` of a discard. The kernel sends
    /// REMOVE *before* it zaps, and lets the discarding thread go on to zap
    /// once the event is read: until then, a page taken out of the page
    /// table (moved to staging) would escape the zap and keep data the
    /// program has discarded. Operations leave a fenced page that is still
    /// present alone until it is gone.
    pub(crate) fn fence(&mut self, pages: PageRange) {
        self.fences.push((pages, Instant::now()));
    }

    /// Whether the present page at `addr` may still be zapped by a discard
    /// in progress.
    pub(crate) fn zap_pending(&mut self, addr: VirtAddr) -> bool {
        if self.fences.is_empty() {
            return false;
        }
        let now = Instant::now();
        self.fences
            .retain(|(_, t)| now.duration_since(*t) < FENCE_TTL);
        self.fences.iter().any(|(r, _)| r.contains(addr))
    }

    /// The page at `page` was seen gone (or filled by uhmm after a fault
    /// on its hole): a discard in progress has zapped it.
    pub(crate) fn unfence(&mut self, page: PageRange) {
        if self.fences.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(self.fences.len());
        for (r, t) in self.fences.drain(..) {
            if !r.overlaps(page) {
                kept.push((r, t));
                continue;
            }
            if let Ok(head) = PageRange::from_bounds(r.start(), page.start()) {
                kept.push((head, t));
            }
            if let Ok(tail) = PageRange::from_bounds(page.end(), r.end()) {
                kept.push((tail, t));
            }
        }
        self.fences = kept;
    }

    /// Records `range` as part of a mapping registered with the
    /// userfaultfd that no region manages (see [`Regions::stale`]), joined
    /// to a part it overlaps or touches. A fault's mark (`capped`) is
    /// dropped if [`MAX_STALE`] parts wait already (the next fault there
    /// marks its page again); a let-go's never is. Whether it is recorded.
    pub(crate) fn add_stale(&mut self, range: PageRange, capped: bool) -> bool {
        let touches = |s: &PageRange| s.start() <= range.end() && range.start() <= s.end();
        if let Some(s) = self.stale.iter_mut().find(|s| touches(s)) {
            let (start, end) = (s.start().min(range.start()), s.end().max(range.end()));
            if let Ok(joined) = PageRange::from_bounds(start, end) {
                *s = joined;
            }
            return true;
        }
        if capped && self.stale.len() >= MAX_STALE {
            return false;
        }
        self.stale.push(range);
        true
    }

    /// Whether stale registrations wait to be unregistered.
    pub(crate) fn has_stale(&self) -> bool {
        !self.stale.is_empty()
    }

    /// Takes the parts of stale registrations.
    pub(crate) fn take_stale(&mut self) -> Vec<PageRange> {
        std::mem::take(&mut self.stale)
    }

    /// Every managed range.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.by_start.values().map(|r| r.range)
    }

    /// Records a new operation of `owner` on `range`, holding a slot for
    /// the owner in the state table until [`end_op`](Self::end_op).
    ///
    /// # Errors
    ///
    /// [`StateError::TooManyOwners`] if the table cannot name the owner.
    pub(crate) fn begin_op(&mut self, owner: Owner, range: PageRange) -> Result<OpId, StateError> {
        self.states.reserve(owner)?;
        self.next_op += 1;
        let id = OpId(self.next_op);
        self.ops.insert(
            id,
            Op {
                owner,
                range,
                changes: Vec::new(),
                kept: Vec::new(),
                thread: super::fork::tid(),
                deadlock_reported: false,
                probed: None,
                gated: false,
                committing: false,
                taken: Vec::new(),
            },
        );
        Ok(id)
    }

    /// The operation `id`, while it is in flight.
    pub(crate) fn op(&self, id: OpId) -> Option<&Op> {
        self.ops.get(&id)
    }

    /// The operation `id`, to change, while it is in flight.
    pub(crate) fn op_mut(&mut self, id: OpId) -> Option<&mut Op> {
        self.ops.get_mut(&id)
    }

    /// Ends operation `id`; its record, if it was still in flight (only
    /// one party ends an operation: the one that gets the record).
    pub(crate) fn end_op(&mut self, id: OpId) -> Option<Op> {
        let op = self.ops.remove(&id)?;
        self.states.unreserve(op.owner);
        Some(op)
    }

    /// Records that operation `id` took page `i` of its range, which waits
    /// as `taken` says.
    pub(crate) fn record_taken(&mut self, id: OpId, i: usize, taken: Taken) {
        if let Some(op) = self.ops.get_mut(&id) {
            if op.taken.len() <= i {
                op.taken.resize(op.range.npages().max(i + 1), None);
            }
            op.taken[i] = Some(taken);
        }
    }

    /// Page `i` of operation `id` has left it (committed, or put back):
    /// its record, which the caller now owns (a `Taken::Device` record
    /// holds the reference its device page had: whoever takes the record
    /// out is the one that may drop it).
    pub(crate) fn clear_taken(&mut self, id: OpId, i: usize) -> Option<Taken> {
        self.ops
            .get_mut(&id)
            .and_then(|op| op.taken.get_mut(i))
            .and_then(Option::take)
    }

    /// The migrations in flight that may have pages in `within` (anywhere
    /// if `None`).
    pub(crate) fn migrations_in(&self, within: Option<PageRange>) -> Vec<OpId> {
        self.ops
            .iter()
            .filter(|(_, op)| op.gated && within.is_none_or(|r| op.touches(r)))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Reserves the pages `at` (addresses at setup) to operation `id`
    /// until [`unkeep`](Self::unkeep) or its end: no other operation takes
    /// them, so that `id` may wait for a CPU fault on them (a copy-on-write
    /// break) without waiting, through that fault, for an operation that in
    /// turn waits for one of `id`'s pages.
    pub(crate) fn keep(&mut self, id: OpId, at: impl IntoIterator<Item = VirtAddr>) {
        if let Some(op) = self.ops.get_mut(&id) {
            op.kept.extend(at);
        }
    }

    /// Lifts the reservations of operation `id`.
    pub(crate) fn unkeep(&mut self, id: OpId) {
        if let Some(op) = self.ops.get_mut(&id) {
            op.kept.clear();
        }
    }

    /// Whether an operation other than `id` keeps the page now at `at`.
    pub(crate) fn kept_by_other(&self, id: OpId, at: VirtAddr) -> bool {
        self.ops
            .iter()
            .any(|(&other, op)| other != id && op.kept.iter().any(|&a| op.follow(a) == Some(at)))
    }

    /// Whether an operation in flight may have pages in `range`.
    pub(crate) fn ops_in(&self, range: PageRange) -> bool {
        self.ops.values().any(|op| op.touches(range))
    }

    /// Whether an operation of `owner` that may have pages in `within`
    /// (anywhere if `None`) is in flight. Its pages may have left
    /// `Migrating` already while their device pages are not yet freed: an
    /// operation frees them before it ends.
    pub(crate) fn ops_of(&self, owner: Owner, within: Option<PageRange>) -> bool {
        self.ops
            .values()
            .any(|op| op.owner == owner && within.is_none_or(|r| op.touches(r)))
    }

    /// The owner of the operation a stored state names, if it is one.
    pub(crate) fn owner_of(&self, state: Stored) -> Option<Owner> {
        match state {
            Stored::Cpu | Stored::Lost => None,
            Stored::Migrating(id) => self.ops.get(&id).map(|op| op.owner),
            Stored::Device(o, _) | Stored::Exclusive(o, _) => Some(o),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    fn r(first: usize, n: usize) -> PageRange {
        PageRange::new(VirtAddr::new(0x100_0000 + first * PAGE_SIZE), n * PAGE_SIZE).unwrap()
    }

    #[test]
    fn stale_marks_join_follow_moves_and_go_with_unmaps() {
        let mut t = Regions::default();
        assert!(t.add_stale(r(0, 1), true));
        // Touching and overlapping parts join.
        assert!(t.add_stale(r(1, 1), true));
        assert!(t.add_stale(r(1, 2), true));
        assert!(t.add_stale(r(10, 2), true));
        let mut marks = t.stale.clone();
        marks.sort_by_key(|m| m.start());
        assert_eq!(marks, [r(0, 3), r(10, 2)]);
        // An mremap moves the part inside its source, and replaces what
        // was at its destination.
        t.moved(r(1, 1), r(10, 1).start(), |_, _| {});
        let mut marks = t.stale.clone();
        marks.sort_by_key(|m| m.start());
        assert_eq!(marks, [r(0, 1), r(2, 1), r(10, 1), r(11, 1)]);
        // An unmap takes its part out.
        t.unmapped(r(10, 2), |_, _| {});
        let mut marks = t.take_stale();
        marks.sort_by_key(|m| m.start());
        assert_eq!(marks, [r(0, 1), r(2, 1)]);
        assert!(!t.has_stale());
        // Faults' marks are capped, a let-go's are not.
        for i in 0..MAX_STALE {
            assert!(t.add_stale(r(2 * i, 1), true));
        }
        assert!(!t.add_stale(r(2 * MAX_STALE, 1), true));
        assert!(t.add_stale(r(2 * MAX_STALE, 1), false));
    }

    #[test]
    fn tracks_unmap_and_move() {
        let mut t = Regions::default();
        t.insert(r(0, 8));
        t.insert(r(10, 2));
        assert!(t.covers(r(1, 3)) && !t.covers(r(7, 2)));
        assert_eq!(t.overlapping(r(9, 2)), Some(r(10, 2)));
        t.unmapped(r(2, 2), |_, _| {});
        assert_eq!(t.ranges().collect::<Vec<_>>(), [r(0, 2), r(4, 4), r(10, 2)]);
        t.moved(r(10, 2), r(20, 2).start(), |_, _| {});
        assert_eq!(t.ranges().collect::<Vec<_>>(), [r(0, 2), r(4, 4), r(20, 2)]);
        t.moved(r(30, 1), r(40, 1).start(), |_, _| {});
        assert_eq!(
            t.overlapping(r(40, 1)),
            None,
            "moving unmanaged memory manages nothing"
        );
    }

    #[test]
    fn a_region_mapped_anew_is_another_region() {
        let mut t = Regions::default();
        t.insert(r(0, 8));
        let first = t.containing(r(0, 1)).unwrap();
        t.arm(r(0, 1).start());
        // Cut and moved, it is still the same region, still armed.
        t.unmapped(r(2, 2), |_, _| {});
        t.moved(r(4, 4), r(20, 4).start(), |_, _| {});
        for piece in [r(0, 2), r(20, 4)] {
            let p = t.containing(piece).unwrap();
            assert_eq!((p.id, p.armed), (first.id, true));
        }
        // Dropped and mapped again at the same place: another one, not
        // armed.
        t.unmapped(r(0, 2), |_, _| {});
        t.insert(r(0, 2));
        let again = t.containing(r(0, 2)).unwrap();
        assert_ne!(again.id, first.id);
        assert!(!again.armed);
    }

    #[test]
    fn kept_pages_follow_an_mremap_and_are_kept_from_others_only() {
        let mut t = Regions::default();
        t.insert(r(0, 8));
        let owner = Owner::unique();
        let a = t.begin_op(owner, r(0, 8)).unwrap();
        let b = t.begin_op(owner, r(0, 8)).unwrap();
        t.keep(a, [r(2, 1).start()]);
        assert!(t.kept_by_other(b, r(2, 1).start()));
        assert!(!t.kept_by_other(a, r(2, 1).start()), "not from itself");
        assert!(!t.kept_by_other(b, r(3, 1).start()));
        t.moved(r(0, 8), r(20, 8).start(), |_, _| {});
        assert!(t.kept_by_other(b, r(22, 1).start()));
        assert!(!t.kept_by_other(b, r(2, 1).start()));
        t.unkeep(a);
        assert!(!t.kept_by_other(b, r(22, 1).start()));
        t.keep(a, [r(2, 1).start()]);
        t.end_op(a);
        assert!(!t.kept_by_other(b, r(22, 1).start()), "ends with its op");
    }
}
