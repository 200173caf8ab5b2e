//! The table of managed regions: which ranges of the address space uhmm
//! manages, and the state of their pages, kept in step with munmap, mremap
//! and discards as the events report them.

use super::state::{StateTable, Stored};
use crate::addr::{PageRange, VirtAddr};
use std::collections::BTreeMap;

/// Managed ranges by start address (they never overlap), whether each is
/// armed (registered for MISSING faults too, once device memory or
/// exclusive access has been used in it), and the stored states of their
/// pages.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    by_start: BTreeMap<VirtAddr, (PageRange, bool)>,
    pub(crate) states: StateTable,
}

impl Regions {
    /// The managed range that overlaps `range`, if any.
    pub(crate) fn overlapping(&self, range: PageRange) -> Option<PageRange> {
        self.by_start
            .range(..range.end())
            .next_back()
            .map(|(_, (r, _))| *r)
            .filter(|r| r.overlaps(range))
    }

    /// The one managed range that contains all of `range`, and whether it
    /// is armed.
    pub(crate) fn containing(&self, range: PageRange) -> Option<(PageRange, bool)> {
        self.by_start
            .range(..=range.start())
            .next_back()
            .map(|(_, &r)| r)
            .filter(|(r, _)| r.contains_range(range))
    }

    /// Marks the managed range starting at `start` armed.
    pub(crate) fn arm(&mut self, start: VirtAddr) {
        if let Some((_, armed)) = self.by_start.get_mut(&start) {
            *armed = true;
        }
    }

    /// Whether `range` lies entirely inside managed ranges.
    pub(crate) fn covers(&self, range: PageRange) -> bool {
        let mut cursor = range.start();
        for (_, (r, _)) in self.by_start.range(..range.end()) {
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

    pub(crate) fn insert(&mut self, range: PageRange) {
        self.insert_armed(range, false);
    }

    fn insert_armed(&mut self, range: PageRange, armed: bool) {
        self.by_start.insert(range.start(), (range, armed));
    }

    /// Removes whatever lies in `gone` (an unmap), splitting ranges it cuts.
    /// The stored states of its pages are handed to `gone`.
    pub(crate) fn unmapped(&mut self, gone: PageRange, states: impl FnMut(VirtAddr, Stored)) {
        self.states.clear(gone, states);
        let hit: Vec<(PageRange, bool)> = self
            .by_start
            .values()
            .copied()
            .filter(|(r, _)| r.overlaps(gone))
            .collect();
        for (r, armed) in hit {
            self.by_start.remove(&r.start());
            if let Ok(head) = PageRange::from_bounds(r.start(), gone.start()) {
                self.insert_armed(head, armed);
            }
            if let Ok(tail) = PageRange::from_bounds(gone.end(), r.end()) {
                self.insert_armed(tail, armed);
            }
        }
    }

    /// Moves what lies in `old` to start at `to` (an mremap).
    /// The states of pages replaced at the destination go to `gone`.
    pub(crate) fn moved(
        &mut self,
        old: PageRange,
        to: VirtAddr,
        mut gone: impl FnMut(VirtAddr, Stored),
    ) {
        let was = self.overlapping(old).map(|r| self.by_start[&r.start()].1);
        let Ok(new) = PageRange::new(to, old.len()) else {
            self.unmapped(old, gone);
            return;
        };
        // Whatever was at the destination was replaced.
        self.unmapped(new, &mut gone);
        self.states.move_range(old, to);
        self.unmapped(old, &mut gone);
        if let Some(armed) = was {
            self.insert_armed(new, armed);
        }
    }

    /// Every managed range.
    pub(crate) fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.by_start.values().map(|&(r, _)| r)
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
}
