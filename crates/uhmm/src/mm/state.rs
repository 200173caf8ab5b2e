//! The state of every managed page (DESIGN.md, "The states of a managed
//! page"), kept in a compact per-page table.
//!
//! A page that no device has touched is in the CPU's hands: *Empty* or
//! *System*, which the CPU page table already says (pagemap), so the table
//! stores nothing for it. Only the states uhmm itself puts a page in —
//! *Migrating*, *Device* and *Exclusive* — are stored, one 8-byte entry per
//! page, in chunks of 512 entries (one per 2 MiB of address space) that exist
//! only while one of their pages is in such a state. Metadata therefore
//! grows with the pages devices use, not with the size of managed memory,
//! and is at most 8 bytes per page where it exists. A lookup is O(1) in the
//! region size (a search among the chunks in use, then an index).

use super::Owner;
use crate::addr::{DevicePfn, PAGE_SHIFT, PageRange, VirtAddr};
use std::collections::BTreeMap;
use std::fmt;

/// Where a managed page lives and who may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Never touched, or discarded: no page backs it.
    Empty,
    /// In system memory, mapped for the CPU.
    System,
    /// Being migrated by `owner`: taken out of the CPU page table, so a CPU
    /// access waits until the migration commits or is undone.
    Migrating {
        /// The device migrating it.
        owner: Owner,
    },
    /// In the device memory of `owner`, at `pfn`; a CPU access brings it
    /// back.
    Device {
        /// The device holding it.
        owner: Owner,
        /// Its page of device memory.
        pfn: DevicePfn,
    },
    /// In system memory but reserved to `owner` for device atomics; a CPU
    /// access revokes that.
    Exclusive {
        /// The device holding it.
        owner: Owner,
    },
}

/// The generation of one operation in flight on managed pages (a migration,
/// an exclusive grab or revoke): pages it has taken out of the CPU page
/// table are `Migrating(op)`, so that no other operation — nor a later one
/// of the same owner — can mistake them for its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct OpId(pub(crate) u64);

/// What the table holds for one page: the CPU's states are not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Stored {
    /// Empty or System: ask the CPU page table.
    Cpu,
    /// Taken out of the CPU page table by the operation `OpId`.
    Migrating(OpId),
    Device(Owner, DevicePfn),
    /// Exclusive to the owner; the page waits at `hold` (a page number of
    /// uhmm's staging area) until a CPU access takes it back.
    Exclusive(Owner, u64),
    /// Lost (its data could not be brought back) but not yet poisoned:
    /// the poison was refused while a layout change was pending. A CPU
    /// access poisons it then (SIGBUS, never zeros); a discard or unmap
    /// ends it, as it ends a poisoned entry.
    Lost,
}

/// A state could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// More distinct owners than an entry can name.
    #[error("more than {max} device owners in one address space")]
    TooManyOwners {
        /// The most there can be.
        max: usize,
    },
    /// A device page number too large for an entry.
    #[error("{pfn} exceeds the largest device page number {max:#x}")]
    PfnTooLarge {
        /// The page number.
        pfn: DevicePfn,
        /// The largest one an entry holds.
        max: u64,
    },
}

// Entry layout: bits 0..2 the kind, then for Device and Exclusive bits
// 2..18 the owner's slot and 18..64 the device page number (2^46 pages:
// 256 TiB of 4 KiB pages per device); for Migrating bits 2..64 the
// operation's generation, which is never 0: Migrating with generation 0 is
// Lost.
const KIND_BITS: u32 = 2;
const OWNER_BITS: u32 = 16;
const PFN_SHIFT: u32 = KIND_BITS + OWNER_BITS;
const MAX_PFN: u64 = (1 << (64 - PFN_SHIFT)) - 1;
const MAX_OWNERS: usize = 1 << OWNER_BITS;
const KIND_MIGRATING: u64 = 1;
const KIND_DEVICE: u64 = 2;
const KIND_EXCLUSIVE: u64 = 3;

/// Pages per chunk: one chunk covers 2 MiB of address space.
const CHUNK_PAGES: usize = 512;
const CHUNK_SHIFT: u32 = PAGE_SHIFT + CHUNK_PAGES.trailing_zeros();

/// Generations an entry can name (ops are numbered from 1 and never reused).
pub(crate) const MAX_OP: u64 = (1 << (64 - KIND_BITS)) - 1;

struct Chunk {
    entries: [u64; CHUNK_PAGES],
    /// Entries that are not `Cpu` (the chunk is freed when none is left).
    used: u16,
}

/// An owner's slot: who it is, and how many entries plus reservations name
/// it (the slot is free again when none do).
#[derive(Debug, Clone, Copy)]
struct Slot {
    owner: Owner,
    refs: u64,
}

/// The stored states of the pages of one address space.
#[derive(Default)]
pub(crate) struct StateTable {
    chunks: BTreeMap<usize, Box<Chunk>>,
    /// Owner slots; a slot is reused once no entry and no reservation
    /// names its owner, so the table names at most `MAX_OWNERS` owners
    /// *at once*, not in the address space's lifetime.
    slots: Vec<Option<Slot>>,
    by_owner: std::collections::HashMap<Owner, usize, crate::addr::IdBuildHasher>,
    /// Pages watched for a change of hands ([`watch`](Self::watch)): for
    /// each, the state it was watched in and whether it changed since.
    watches: BTreeMap<WatchId, (Stored, bool)>,
    next_watch: u64,
}

/// Names one watch of [`StateTable::watch`] (ordered by page, then age).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WatchId {
    addr: VirtAddr,
    n: u64,
}

impl WatchId {
    /// The ids of every watch on a page of `range`.
    fn span(range: PageRange) -> std::ops::Range<WatchId> {
        let at = |addr| WatchId { addr, n: 0 };
        at(range.start())..at(range.end())
    }
}

/// The most watches kept at once; past it one is dropped (the lowest
/// page's), and reads as changed.
const MAX_WATCHES: usize = 4096;

impl fmt::Debug for StateTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateTable")
            .field("chunks", &self.chunks.len())
            .field("owners", &self.by_owner.len())
            .finish()
    }
}

fn split(addr: VirtAddr) -> (usize, usize) {
    let page = addr.get() >> PAGE_SHIFT;
    (addr.get() >> CHUNK_SHIFT, page % CHUNK_PAGES)
}

impl StateTable {
    /// The stored state of the page at `addr`.
    pub(crate) fn get(&self, addr: VirtAddr) -> Stored {
        let (chunk, index) = split(addr);
        self.chunks
            .get(&chunk)
            .map_or(Stored::Cpu, |c| self.decode(c.entries[index]))
    }

    /// Records `state` for the page at `addr` and returns the old one.
    pub(crate) fn set(&mut self, addr: VirtAddr, state: Stored) -> Result<Stored, StateError> {
        let entry = self.encode(state)?;
        if crate::record::recording() {
            recorded(addr, state);
        }
        if !self.watches.is_empty() {
            self.note(addr, state);
        }
        let (chunk, index) = split(addr);
        let old = self.replace(chunk, index, entry);
        let was = self.decode(old);
        self.unref(old);
        Ok(was)
    }

    /// Stores `entry` (whose owner reference `encode` took) at `index` of
    /// `chunk`; returns the old entry (whose reference the caller drops).
    fn replace(&mut self, chunk: usize, index: usize, entry: u64) -> u64 {
        match self.chunks.get_mut(&chunk) {
            Some(c) => {
                let old = std::mem::replace(&mut c.entries[index], entry);
                c.used = c.used + u16::from(entry != 0) - u16::from(old != 0);
                if c.used == 0 {
                    self.chunks.remove(&chunk);
                }
                old
            }
            None if entry == 0 => 0,
            None => {
                let mut c = Box::new(Chunk {
                    entries: [0; CHUNK_PAGES],
                    used: 1,
                });
                c.entries[index] = entry;
                self.chunks.insert(chunk, c);
                0
            }
        }
    }

    /// Forgets the state of every page of `range` (it was unmapped or
    /// discarded), calling `gone` with each page that had one.
    pub(crate) fn clear(&mut self, range: PageRange, mut gone: impl FnMut(VirtAddr, Stored)) {
        if !self.watches.is_empty() {
            for (_, (_, changed)) in self.watches.range_mut(WatchId::span(range)) {
                *changed = true;
            }
        }
        let first = range.start().get() >> CHUNK_SHIFT;
        let last = (range.end().get() - 1) >> CHUNK_SHIFT;
        let keys: Vec<usize> = self.chunks.range(first..=last).map(|(&k, _)| k).collect();
        let mut dropped = Vec::new();
        for key in keys {
            let Some(chunk) = self.chunks.get_mut(&key) else {
                continue;
            };
            for (i, entry) in chunk.entries.iter_mut().enumerate() {
                let addr = VirtAddr::new((key << CHUNK_SHIFT) + (i << PAGE_SHIFT));
                if *entry == 0 || !range.contains(addr) {
                    continue;
                }
                let old = std::mem::take(entry);
                chunk.used -= 1;
                if crate::record::recording() {
                    crate::record::note(
                        crate::record::What::State,
                        addr.get(),
                        crate::record::kind::CLEARED,
                        crate::PAGE_SIZE,
                        0,
                        0,
                    );
                }
                gone(addr, decode(&self.slots, old));
                dropped.push(old);
            }
            if chunk.used == 0 {
                self.chunks.remove(&key);
            }
        }
        for old in dropped {
            self.unref(old);
        }
    }

    /// Watches the page at `addr`, in state `seen` now, until
    /// [`unwatch`](Self::unwatch): it reads [`changed`](Self::changed) once
    /// it has been in a state other than `seen` and `Migrating` (an
    /// operation that took it out and put it back as it was changed
    /// nothing, a fault back its device failed, say), or was unmapped,
    /// discarded or moved away. A page that went home and came back to the
    /// same device page reads changed: it was `Cpu` in between.
    pub(crate) fn watch(&mut self, addr: VirtAddr, seen: Stored) -> WatchId {
        if self.watches.len() >= MAX_WATCHES {
            self.watches.pop_first();
        }
        self.next_watch += 1;
        let id = WatchId {
            addr,
            n: self.next_watch,
        };
        // Changed already if it left `seen` before the watch began.
        let changed = self.get(addr) != seen;
        self.watches.insert(id, (seen, changed));
        id
    }

    /// Whether the page of watch `id` changed hands since it was watched
    /// (true for a watch dropped as too many, or ended).
    pub(crate) fn changed(&self, id: WatchId) -> bool {
        self.watches.get(&id).is_none_or(|&(_, changed)| changed)
    }

    /// Ends watch `id`.
    pub(crate) fn unwatch(&mut self, id: WatchId) {
        self.watches.remove(&id);
    }

    /// The page at `addr` is in state `now` from now on.
    fn note(&mut self, addr: VirtAddr, now: Stored) {
        if matches!(now, Stored::Migrating(_)) {
            return;
        }
        let Ok(page) = PageRange::new(addr, crate::PAGE_SIZE) else {
            return;
        };
        for (_, (seen, changed)) in self.watches.range_mut(WatchId::span(page)) {
            *changed |= now != *seen;
        }
    }

    /// Every page of `range` with a stored state, in address order.
    pub(crate) fn entries(&self, range: PageRange) -> Vec<(VirtAddr, Stored)> {
        let mut out = Vec::new();
        let first = range.start().get() >> CHUNK_SHIFT;
        let last = (range.end().get() - 1) >> CHUNK_SHIFT;
        for (&key, chunk) in self.chunks.range(first..=last) {
            for (i, &entry) in chunk.entries.iter().enumerate() {
                let addr = VirtAddr::new((key << CHUNK_SHIFT) + (i << PAGE_SHIFT));
                if entry != 0 && range.contains(addr) {
                    out.push((addr, self.decode(entry)));
                }
            }
        }
        out
    }

    /// The pages of `within` (everywhere if `None`) whose stored state
    /// `pick` selects.
    pub(crate) fn select(
        &self,
        within: Option<PageRange>,
        mut pick: impl FnMut(Stored) -> bool,
    ) -> Vec<(VirtAddr, Stored)> {
        match within {
            Some(r) => self
                .entries(r)
                .into_iter()
                .filter(|&(_, s)| pick(s))
                .collect(),
            None => self.find(pick),
        }
    }

    /// Every page anywhere whose stored state `pick` selects.
    pub(crate) fn find(&self, mut pick: impl FnMut(Stored) -> bool) -> Vec<(VirtAddr, Stored)> {
        let mut out = Vec::new();
        for (&key, chunk) in &self.chunks {
            for (i, &entry) in chunk.entries.iter().enumerate() {
                if entry == 0 {
                    continue;
                }
                let state = self.decode(entry);
                if pick(state) {
                    out.push((
                        VirtAddr::new((key << CHUNK_SHIFT) + (i << PAGE_SHIFT)),
                        state,
                    ));
                }
            }
        }
        out
    }

    /// Moves the states of `old` to the same offsets from `to` (an mremap).
    pub(crate) fn move_range(&mut self, old: PageRange, to: VirtAddr) {
        let mut moved = Vec::new();
        self.clear(old, |addr, state| moved.push((addr, state)));
        for (addr, state) in moved {
            let offset = addr.get() - old.start().get();
            if let Some(new) = to.checked_add(offset) {
                // Encodable where it came from; `clear` just freed its
                // owner's slot if it was the last entry naming it, so a slot
                // is there to take again.
                let _ = self.set(new, state);
            }
        }
    }

    /// Holds a slot for `owner` (taking a free one if it has none) so that
    /// states naming it can be recorded until [`unreserve`](Self::unreserve).
    ///
    /// # Errors
    ///
    /// [`StateError::TooManyOwners`] if every slot names another owner.
    pub(crate) fn reserve(&mut self, owner: Owner) -> Result<(), StateError> {
        let slot = self.slot_of(owner)?;
        if let Some(s) = &mut self.slots[slot] {
            s.refs += 1;
        }
        Ok(())
    }

    /// Drops a reservation taken by [`reserve`](Self::reserve).
    pub(crate) fn unreserve(&mut self, owner: Owner) {
        if let Some(&slot) = self.by_owner.get(&owner) {
            self.unref_slot(slot);
        }
    }

    /// Owners named by a slot now.
    pub(crate) fn owners(&self) -> usize {
        self.by_owner.len()
    }

    /// Bytes of metadata held.
    pub(crate) fn bytes(&self) -> usize {
        self.chunks.len() * std::mem::size_of::<Chunk>()
            + self.slots.capacity() * std::mem::size_of::<Option<Slot>>()
    }

    /// Pages with a stored state.
    pub(crate) fn pages(&self) -> usize {
        self.chunks.values().map(|c| usize::from(c.used)).sum()
    }

    /// The slot naming `owner`, taking a free one if it has none (with no
    /// reference yet).
    fn slot_of(&mut self, owner: Owner) -> Result<usize, StateError> {
        if let Some(&slot) = self.by_owner.get(&owner) {
            return Ok(slot);
        }
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.slots.len() < MAX_OWNERS => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => return Err(StateError::TooManyOwners { max: MAX_OWNERS }),
        };
        self.slots[slot] = Some(Slot { owner, refs: 0 });
        self.by_owner.insert(owner, slot);
        Ok(slot)
    }

    fn unref_slot(&mut self, slot: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        s.refs = s.refs.saturating_sub(1);
        if s.refs == 0 {
            let owner = s.owner;
            self.slots[slot] = None;
            self.by_owner.remove(&owner);
        }
    }

    /// Drops the owner reference an entry held.
    fn unref(&mut self, entry: u64) {
        if matches!(entry & KIND_MASK, KIND_DEVICE | KIND_EXCLUSIVE) {
            self.unref_slot(((entry >> KIND_BITS) as usize) & (MAX_OWNERS - 1));
        }
    }

    /// The entry for `state`, with a reference on its owner's slot.
    fn encode(&mut self, state: Stored) -> Result<u64, StateError> {
        let (kind, owner, pfn) = match state {
            Stored::Cpu => return Ok(0),
            Stored::Migrating(op) => return Ok(KIND_MIGRATING | (op.0 & MAX_OP) << KIND_BITS),
            Stored::Lost => return Ok(KIND_MIGRATING),
            Stored::Device(o, pfn) => (KIND_DEVICE, o, pfn.0),
            Stored::Exclusive(o, hold) => (KIND_EXCLUSIVE, o, hold),
        };
        if pfn > MAX_PFN {
            return Err(StateError::PfnTooLarge {
                pfn: DevicePfn(pfn),
                max: MAX_PFN,
            });
        }
        let slot = self.slot_of(owner)?;
        if let Some(s) = &mut self.slots[slot] {
            s.refs += 1;
        }
        Ok(kind | (slot as u64) << KIND_BITS | pfn << PFN_SHIFT)
    }

    fn decode(&self, entry: u64) -> Stored {
        decode(&self.slots, entry)
    }
}

/// Notes `addr`'s new state in the flight recorder (`crate::record`).
fn recorded(addr: VirtAddr, state: Stored) {
    use crate::record::{What, kind, note};
    let (k, value) = match state {
        Stored::Cpu => (kind::CPU, 0),
        Stored::Migrating(op) => (kind::MIGRATING, op.0),
        Stored::Device(_, pfn) => (kind::DEVICE, pfn.0),
        Stored::Exclusive(_, hold) => (kind::EXCLUSIVE, hold),
        Stored::Lost => (kind::LOST, 0),
    };
    note(
        What::State,
        addr.get(),
        k,
        crate::PAGE_SIZE,
        0,
        value as i64,
    );
}

const KIND_MASK: u64 = (1 << KIND_BITS) - 1;

fn decode(slots: &[Option<Slot>], entry: u64) -> Stored {
    let kind = entry & KIND_MASK;
    if kind == KIND_MIGRATING {
        return match entry >> KIND_BITS {
            0 => Stored::Lost,
            op => Stored::Migrating(OpId(op)),
        };
    }
    let slot = ((entry >> KIND_BITS) as usize) & (MAX_OWNERS - 1);
    // Entries are only made by `encode`, which names a slot it holds.
    let Some(Some(s)) = slots.get(slot) else {
        return Stored::Cpu;
    };
    match kind {
        KIND_DEVICE => Stored::Device(s.owner, DevicePfn(entry >> PFN_SHIFT)),
        KIND_EXCLUSIVE => Stored::Exclusive(s.owner, entry >> PFN_SHIFT),
        _ => Stored::Cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    fn page(i: usize) -> VirtAddr {
        VirtAddr::new(0x7f00_0000_0000 + i * PAGE_SIZE)
    }

    fn pages(first: usize, n: usize) -> PageRange {
        PageRange::new(page(first), n * PAGE_SIZE).unwrap()
    }

    #[test]
    fn set_get_round_trip_every_kind() {
        let mut t = StateTable::default();
        let (a, b) = (Owner::unique(), Owner::unique());
        let states = [
            Stored::Migrating(OpId(MAX_OP)),
            Stored::Device(b, DevicePfn(MAX_PFN)),
            Stored::Exclusive(a, 9),
            Stored::Device(a, DevicePfn(0)),
            Stored::Lost,
            Stored::Migrating(OpId(1)),
        ];
        for (i, &s) in states.iter().enumerate() {
            assert_eq!(t.set(page(i * 1000), s), Ok(Stored::Cpu));
        }
        for (i, &s) in states.iter().enumerate() {
            assert_eq!(t.get(page(i * 1000)), s);
            assert_eq!(t.get(page(i * 1000 + 1)), Stored::Cpu);
        }
        assert_eq!(t.pages(), states.len());
        assert_eq!(
            t.set(page(0), Stored::Device(a, DevicePfn(MAX_PFN + 1))),
            Err(StateError::PfnTooLarge {
                pfn: DevicePfn(MAX_PFN + 1),
                max: MAX_PFN
            })
        );
        assert_eq!(
            t.get(page(0)),
            Stored::Migrating(OpId(MAX_OP)),
            "a failed set changes nothing"
        );
    }

    #[test]
    fn owner_slots_are_reused_when_no_entry_names_them() {
        let mut t = StateTable::default();
        // Far more owners over time than slots, never more than two at once.
        for i in 0..(MAX_OWNERS + 10) {
            let o = Owner::unique();
            t.set(page(0), Stored::Device(o, DevicePfn(i as u64)))
                .unwrap();
            t.set(page(1), Stored::Exclusive(o, 1)).unwrap();
            assert_eq!(t.owners(), 1, "the previous owner's slot was freed");
        }
        t.set(page(0), Stored::Cpu).unwrap();
        t.set(page(1), Stored::Cpu).unwrap();
        assert_eq!(t.owners(), 0);
        // A full table is an error before anything is recorded.
        let held: Vec<Owner> = (0..MAX_OWNERS).map(|_| Owner::unique()).collect();
        for &o in &held {
            t.reserve(o).unwrap();
        }
        let late = Owner::unique();
        assert_eq!(
            t.reserve(late),
            Err(StateError::TooManyOwners { max: MAX_OWNERS })
        );
        assert!(t.set(page(2), Stored::Device(late, DevicePfn(0))).is_err());
        assert_eq!(t.get(page(2)), Stored::Cpu);
        t.unreserve(held[7]);
        t.reserve(late).unwrap();
        t.set(page(2), Stored::Device(late, DevicePfn(0))).unwrap();
        t.unreserve(late);
        assert_eq!(t.get(page(2)), Stored::Device(late, DevicePfn(0)));
    }

    #[test]
    fn metadata_follows_pages_in_use_not_region_size() {
        let mut t = StateTable::default();
        let o = Owner::unique();
        assert_eq!(t.bytes(), 0);
        for i in 0..CHUNK_PAGES {
            t.set(page(i), Stored::Device(o, DevicePfn(i as u64)))
                .unwrap();
        }
        let per_page =
            (t.bytes() - t.slots.capacity() * std::mem::size_of::<Option<Slot>>()) / CHUNK_PAGES;
        assert!(per_page <= 8, "{per_page} bytes per page");
        // A page 1 TiB away costs one more chunk, not a table in between.
        t.set(page((1 << 40) / PAGE_SIZE), Stored::Exclusive(o, 1))
            .unwrap();
        assert_eq!(t.chunks.len(), 2);
        // Back to the CPU: chunks are freed.
        for i in 0..CHUNK_PAGES {
            t.set(page(i), Stored::Cpu).unwrap();
        }
        t.set(page((1 << 40) / PAGE_SIZE), Stored::Cpu).unwrap();
        assert_eq!((t.chunks.len(), t.pages()), (0, 0));
    }

    #[test]
    fn clear_reports_exactly_the_pages_in_range() {
        let mut t = StateTable::default();
        let o = Owner::unique();
        for i in 0..2000 {
            t.set(page(i), Stored::Device(o, DevicePfn(i as u64)))
                .unwrap();
        }
        let mut gone = Vec::new();
        t.clear(pages(100, 1000), |a, s| gone.push((a, s)));
        assert_eq!(gone.len(), 1000);
        assert_eq!(gone[0], (page(100), Stored::Device(o, DevicePfn(100))));
        assert_eq!(t.get(page(99)), Stored::Device(o, DevicePfn(99)));
        assert_eq!(t.get(page(100)), Stored::Cpu);
        assert_eq!(t.get(page(1099)), Stored::Cpu);
        assert_eq!(t.get(page(1100)), Stored::Device(o, DevicePfn(1100)));
        assert_eq!(t.pages(), 1000);
    }

    #[test]
    fn move_range_keeps_offsets() {
        let mut t = StateTable::default();
        let o = Owner::unique();
        t.set(page(3), Stored::Exclusive(o, 2)).unwrap();
        t.set(page(700), Stored::Device(o, DevicePfn(7))).unwrap();
        t.move_range(pages(0, 1024), page(5000));
        assert_eq!(t.pages(), 2);
        assert_eq!(t.get(page(3)), Stored::Cpu);
        assert_eq!(t.get(page(5003)), Stored::Exclusive(o, 2));
        assert_eq!(t.get(page(5700)), Stored::Device(o, DevicePfn(7)));
    }

    #[test]
    fn a_watch_sees_a_page_change_hands_even_back_to_where_it_was() {
        let mut t = StateTable::default();
        let o = Owner::unique();
        let dev = Stored::Device(o, DevicePfn(7));
        t.set(page(1), dev).unwrap();
        let w = t.watch(page(1), dev);
        // Taken out and put back as it was (a fault back its device
        // failed): unchanged; so are other pages' changes.
        t.set(page(1), Stored::Migrating(OpId(3))).unwrap();
        t.set(page(1), dev).unwrap();
        t.set(page(2), Stored::Cpu).unwrap();
        assert!(!t.changed(w));
        // Home and back into the same device page: changed.
        t.set(page(1), Stored::Cpu).unwrap();
        t.set(page(1), dev).unwrap();
        assert!(t.changed(w));
        // A watch begun after the page left the state it was seen in (and
        // came back): changed from the start.
        t.set(page(2), dev).unwrap();
        let late = t.watch(page(2), Stored::Device(o, DevicePfn(9)));
        assert!(t.changed(late));
        t.unwatch(w);
        assert!(t.changed(w), "an ended watch reads changed");
        // Another device page, a discard, an mremap: changed.
        let w = t.watch(page(1), dev);
        t.set(page(1), Stored::Device(o, DevicePfn(8))).unwrap();
        assert!(t.changed(w));
        t.set(page(1), dev).unwrap();
        let w = t.watch(page(1), dev);
        t.clear(pages(0, 2), |_, _| {});
        assert!(t.changed(w));
        t.set(page(1), dev).unwrap();
        let w = t.watch(page(1), dev);
        t.move_range(pages(0, 2), page(10));
        assert!(t.changed(w));
        // Past the bound a watch is dropped, and reads changed.
        let mut t = StateTable::default();
        t.set(page(11), dev).unwrap();
        let first = t.watch(page(11), dev);
        let ws: Vec<WatchId> = (0..MAX_WATCHES).map(|_| t.watch(page(11), dev)).collect();
        assert!(t.changed(first));
        assert!(ws.iter().all(|&w| !t.changed(w)));
    }
}

/// The table kept in step with the address space by the fault service.
#[cfg(test)]
mod in_mm {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::mm::Mm;
    use crate::sys::mem::{Advice, Backing, Mapping};
    use std::time::{Duration, Instant};

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn discard_unmap_and_mremap_update_the_states() {
        let mm = Mm::new().unwrap();
        let region = mm.alloc(8 * PAGE_SIZE, Backing::AnonPrivate).unwrap();
        let p = |i: usize| region.range().start().checked_add(i * PAGE_SIZE).unwrap();
        let stored = |a: VirtAddr| crate::mm::lock(&mm.inner.shared.regions).states.get(a);
        assert_eq!(mm.page_state(p(0)).unwrap(), PageState::Empty);
        region.write_at(0, &[1]).unwrap();
        assert_eq!(mm.page_state(p(0)).unwrap(), PageState::System);

        let o = Owner::unique();
        for i in [1, 2, 5, 6] {
            mm.set_state(p(i), Stored::Device(o, DevicePfn(i as u64)))
                .unwrap();
        }
        assert_eq!(
            mm.page_state(p(5)).unwrap(),
            PageState::Device {
                owner: o,
                pfn: DevicePfn(5)
            }
        );
        assert_eq!(mm.stats().state_pages, 4);

        // MADV_DONTNEED: the page is empty again.
        let mapping = region.mapping().unwrap();
        mapping
            .advise(mapping.sub(PAGE_SIZE, PAGE_SIZE).unwrap(), Advice::DontNeed)
            .unwrap();
        wait_for("discard clears the state", || stored(p(1)) == Stored::Cpu);

        // mremap: the states move with the pages.
        let dest = Mapping::anon(2 * PAGE_SIZE).unwrap().leak();
        // SAFETY: both ranges belong to this test and nothing refers into
        // them; the destination's pages are replaced.
        let moved = unsafe {
            rustix::mm::mremap_fixed(
                p(5).as_mut_ptr(),
                2 * PAGE_SIZE,
                2 * PAGE_SIZE,
                rustix::mm::MremapFlags::MAYMOVE,
                dest.start().as_mut_ptr(),
            )
        }
        .unwrap();
        assert_eq!(moved as usize, dest.start().get());
        wait_for("mremap moves the states", || {
            stored(dest.start()) == Stored::Device(o, DevicePfn(5))
        });
        assert_eq!(stored(p(5)), Stored::Cpu);
        assert!(mm.is_managed(dest), "the moved pages stay managed");

        // munmap: the state is gone.
        // SAFETY: a page of this test's region, nothing refers into it.
        unsafe { rustix::mm::munmap(p(2).as_mut_ptr(), PAGE_SIZE) }.unwrap();
        wait_for("munmap clears the state", || stored(p(2)) == Stored::Cpu);
        assert_eq!(mm.stats().state_pages, 2, "the two moved pages remain");
        // SAFETY: the moved pages belong to this test.
        unsafe { rustix::mm::munmap(dest.start().as_mut_ptr(), dest.len()) }.unwrap();
    }
}
