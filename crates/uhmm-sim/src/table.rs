//! The device page table: virtual page → permission, like dmirror's xarray.
//!
//! The software device reaches system memory through the process's virtual
//! addresses (as an SVA/ATS device does), so a translation is the
//! permission the device was granted for the page; the page itself is
//! whatever the address maps. Entries live in leaves of 512 (one per 2 MiB
//! of address space), made when first used and freed when emptied.

use std::collections::BTreeMap;
use uhmm::{PAGE_SHIFT, PageRange, VirtAddr};

/// The device may read the page.
pub(crate) const READ: u8 = 1;
/// The device may write the page (always with `READ`).
pub(crate) const WRITE: u8 = 2;
/// The page lives in the device's own memory (at the device page the
/// address space records for it).
pub(crate) const DEV: u8 = 4;
/// The page is held exclusive for the device's atomics (in uhmm's staging
/// slot for it).
pub(crate) const ATOMIC: u8 = 8;

const LEAF_PAGES: usize = 512;
const LEAF_SHIFT: u32 = PAGE_SHIFT + LEAF_PAGES.trailing_zeros();

#[derive(Debug)]
struct Leaf {
    perms: [u8; LEAF_PAGES],
    used: u16,
}

/// Translations of one device.
#[derive(Debug, Default)]
pub(crate) struct DeviceTable {
    leaves: BTreeMap<usize, Box<Leaf>>,
    entries: usize,
    /// Ranges this device is making exclusive to itself right now: no
    /// translation is made there until the grab has programmed its own.
    pub(crate) grabbing: Vec<PageRange>,
}

fn split(addr: VirtAddr) -> (usize, usize) {
    (
        addr.get() >> LEAF_SHIFT,
        (addr.get() >> PAGE_SHIFT) % LEAF_PAGES,
    )
}

impl DeviceTable {
    /// The permission held for the page at `addr` (0: none).
    pub(crate) fn get(&self, addr: VirtAddr) -> u8 {
        let (leaf, i) = split(addr);
        self.leaves.get(&leaf).map_or(0, |l| l.perms[i])
    }

    /// Sets the permission of the page at `addr` (0 removes it).
    pub(crate) fn set(&mut self, addr: VirtAddr, perm: u8) {
        let (key, i) = split(addr);
        let leaf = self.leaves.entry(key).or_insert_with(|| {
            Box::new(Leaf {
                perms: [0; LEAF_PAGES],
                used: 0,
            })
        });
        let old = std::mem::replace(&mut leaf.perms[i], perm);
        match (old != 0, perm != 0) {
            (false, true) => {
                leaf.used += 1;
                self.entries += 1;
            }
            (true, false) => {
                leaf.used -= 1;
                self.entries -= 1;
            }
            _ => {}
        }
        if leaf.used == 0 {
            self.leaves.remove(&key);
        }
    }

    /// Removes every translation in `range`; returns how many there were.
    pub(crate) fn clear(&mut self, range: PageRange) -> usize {
        self.clear_where(range, |_| true)
    }

    /// Removes the translations in `range` that `pick` selects; returns
    /// how many.
    pub(crate) fn clear_where(&mut self, range: PageRange, pick: impl Fn(u8) -> bool) -> usize {
        let first = range.start().get() >> LEAF_SHIFT;
        let last = (range.end().get() - 1) >> LEAF_SHIFT;
        let mut removed = 0;
        let mut emptied = Vec::new();
        for (&key, leaf) in self.leaves.range_mut(first..=last) {
            let base = key << LEAF_SHIFT;
            let lo = range.start().get().saturating_sub(base) >> PAGE_SHIFT;
            let hi = ((range.end().get() - base) >> PAGE_SHIFT).min(LEAF_PAGES);
            for p in &mut leaf.perms[lo.min(LEAF_PAGES)..hi] {
                if *p != 0 && pick(*p) {
                    *p = 0;
                    leaf.used -= 1;
                    removed += 1;
                }
            }
            if leaf.used == 0 {
                emptied.push(key);
            }
        }
        for key in emptied {
            self.leaves.remove(&key);
        }
        self.entries -= removed;
        removed
    }

    /// How many pages from `start` (up to `end`) hold every bit of `need`.
    pub(crate) fn run(&self, start: VirtAddr, end: VirtAddr, need: u8) -> usize {
        let mut n = 0;
        let mut addr = start;
        while addr < end {
            let (key, mut i) = split(addr);
            let Some(leaf) = self.leaves.get(&key) else {
                break;
            };
            let before = n;
            while i < LEAF_PAGES && addr < end && leaf.perms[i] & need == need {
                n += 1;
                i += 1;
                addr = VirtAddr::new(addr.get() + uhmm::PAGE_SIZE);
            }
            if i < LEAF_PAGES && addr < end || n == before {
                break;
            }
        }
        n
    }

    /// Translations held.
    pub(crate) fn len(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uhmm::PAGE_SIZE;

    fn page(i: usize) -> VirtAddr {
        VirtAddr::new(0x7f00_0000_0000 + i * PAGE_SIZE)
    }

    #[test]
    fn runs_stop_at_the_first_missing_or_weaker_entry() {
        let mut t = DeviceTable::default();
        for i in 0..1500 {
            t.set(page(i), READ | WRITE);
        }
        t.set(page(1000), READ);
        assert_eq!(t.run(page(0), page(2000), READ), 1500, "across leaves");
        assert_eq!(t.run(page(0), page(2000), READ | WRITE), 1000);
        assert_eq!(t.run(page(10), page(20), READ), 10, "bounded by end");
        assert_eq!(t.run(page(1500), page(2000), READ), 0);
        assert_eq!(t.len(), 1500);
    }

    #[test]
    fn clear_removes_exactly_the_range_and_frees_leaves() {
        let mut t = DeviceTable::default();
        for i in 0..1024 {
            t.set(page(i), READ);
        }
        let r = PageRange::new(page(100), 800 * PAGE_SIZE).unwrap();
        assert_eq!(t.clear(r), 800);
        assert_eq!((t.get(page(99)), t.get(page(100))), (READ, 0));
        assert_eq!((t.get(page(899)), t.get(page(900))), (0, READ));
        assert_eq!(t.len(), 224);
        let all = PageRange::new(VirtAddr::new(0), usize::MAX - PAGE_SIZE + 1).unwrap();
        assert_eq!(t.clear(all), 224);
        assert!(t.leaves.is_empty());
        t.set(page(5), READ);
        t.set(page(5), 0);
        assert!(t.leaves.is_empty() && t.len() == 0);
    }
}
