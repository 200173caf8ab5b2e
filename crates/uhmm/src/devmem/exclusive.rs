//! Exclusive access for device atomics (the kernel's
//! `make_device_exclusive`).
//!
//! A page made exclusive to a device leaves the CPU page table for a slot
//! of uhmm's staging area, where the device uses it; the CPU's next access
//! to it (a read, a write, or a system call on its behalf) revokes the
//! exclusivity — the device is told by an [`NotifyEvent::Exclusive`]
//! invalidation with no owner — and the page, with whatever the device
//! wrote, comes back.

use super::migrate::MigrateError;
use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::mm::notifier::{NotifierRange, NotifyEvent};
use crate::mm::service::Shared;
use crate::mm::state::Stored;
use crate::mm::{Mm, MmError, Owner, lock_poisoned as lock};
use crate::sys::mem::{self, Prot};
use crate::sys::pagemap::{Categories, ScanQuery};
use crate::sys::procmap::VmaKind;
use crate::sys::uffd::{CopyMode, MoveMode, Stop};

impl Mm {
    /// Makes the pages of `range` exclusive to `owner`: the CPU loses
    /// access until it touches them, and then gets them back with the
    /// device's writes. Pages are faulted in writable first (a page on a
    /// device comes back, a copy-on-write page is copied). The invalidation
    /// carries [`NotifyEvent::Exclusive`] with `owner`: the device must
    /// skip its own (as in the kernel) and take the returned pages into its
    /// page table under its notifier protocol.
    ///
    /// Returns how many pages are exclusive now (a page that changed state
    /// meanwhile is left out).
    ///
    /// # Errors
    ///
    /// [`MigrateError::InvalidRange`] unless the range lies in one managed
    /// region of private anonymous read-write memory (the kernel refuses
    /// other memory too); [`MigrateError::Mm`] if the pages cannot be
    /// faulted in.
    pub fn make_device_exclusive(
        &self,
        range: PageRange,
        owner: Owner,
    ) -> Result<usize, MigrateError> {
        let shared = self.shared();
        let invalid = |reason| MigrateError::InvalidRange { range, reason };
        let (region, armed) = lock(&shared.regions)
            .containing(range)
            .ok_or(invalid("not inside one managed region"))?;
        let vmas = shared
            .procmap()
            .map_err(MmError::from)?
            .covering(range)
            .map_err(MmError::from)?;
        let covered: usize = vmas
            .iter()
            .filter_map(|v| v.range.intersection(range))
            .map(PageRange::len)
            .sum();
        if covered != range.len()
            || !vmas.iter().all(|v| {
                v.kind() == VmaKind::AnonPrivate && v.perms.contains(Prot::READ | Prot::WRITE)
            })
        {
            return Err(invalid(
                "exclusive access needs mapped private anonymous read-write memory",
            ));
        }
        if !armed {
            shared.arm(region, &vmas)?;
        }
        shared.sync_events();
        // Fault in (writable) every page but those already exclusive to
        // this owner: touching those would take them back from it.
        let mine: Vec<VirtAddr> = lock(&shared.regions)
            .states
            .entries(range)
            .into_iter()
            .filter(|&(_, s)| matches!(s, Stored::Exclusive(o, _) if o == owner))
            .map(|(a, _)| a)
            .collect();
        let mut cursor = range.start();
        for a in mine.iter().copied().chain(std::iter::once(range.end())) {
            if let Ok(gap) = PageRange::from_bounds(cursor, a) {
                mem::populate(gap, true).map_err(MmError::from)?;
            }
            cursor = a.checked_add(PAGE_SIZE).unwrap_or(range.end());
        }
        if !shared.gate.enter(true) {
            return Err(MigrateError::Retry { range });
        }
        let result = grab(shared, range, owner);
        shared.gate.leave();
        shared.poke();
        result
    }

    /// Where the device holding `addr`'s page exclusive finds it: a slot
    /// of uhmm's staging area, valid until the page's next invalidation.
    pub fn exclusive_page(&self, addr: VirtAddr, owner: Owner) -> Option<VirtAddr> {
        let shared = self.shared();
        match lock(&shared.regions).states.get(addr.page_down()) {
            Stored::Exclusive(o, hold) if o == owner => Some(shared.staging().ok()?.page_at(hold)),
            _ => None,
        }
    }
}

fn grab(shared: &Shared, range: PageRange, owner: Owner) -> Result<usize, MigrateError> {
    let notify = NotifierRange::new(range, NotifyEvent::Exclusive).with_owner(owner);
    let _guard = shared
        .notifiers
        .invalidate_start(&notify)
        .map_err(|_| MigrateError::Retry { range })?;
    let staging = shared.staging()?;
    let run = staging.alloc(range, super::staging::Want::Empty, true)?;
    let mut claimed = Vec::new();
    let mut already = 0;
    {
        let mut regions = lock(&shared.regions);
        for addr in range.pages() {
            match regions.states.get(addr) {
                Stored::Cpu => {}
                Stored::Exclusive(o, _) if o == owner => {
                    already += 1;
                    continue;
                }
                _ => continue,
            }
            let hold = staging.page_number(staging.slot(&run, addr));
            if regions
                .states
                .set(addr, Stored::Exclusive(owner, hold))
                .is_ok()
            {
                claimed.push(addr);
            }
        }
    }
    let mut count = 0;
    for r in super::pagemap::runs(&claimed, usize::MAX >> 1) {
        let res = shared.move_pages(
            staging.slots(&run, r),
            r.start(),
            MoveMode::ALLOW_SRC_HOLES | MoveMode::DONTWAKE,
        );
        let done = super::migrate::bytes_done(res, r.len());
        let mut regions = lock(&shared.regions);
        for (k, addr) in r.pages().enumerate() {
            if k * PAGE_SIZE < done {
                staging.hold(staging.page_number(staging.slot(&run, addr)));
                count += 1;
            } else {
                // Could not be taken (pinned, say): it stays the CPU's.
                let _ = regions.states.set(addr, Stored::Cpu);
            }
        }
    }
    staging.free(run, false, true);
    Ok(count + already)
}

/// Whether the staging slot at `slot` holds a page (present or swapped).
fn slot_holds_page(shared: &Shared, slot: VirtAddr) -> bool {
    let Ok(r) = PageRange::new(slot, PAGE_SIZE) else {
        return false;
    };
    let mut found = Vec::new();
    let query = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
    shared
        .pagemap()
        .ok()
        .and_then(|pm| pm.scan(r, &query, &mut found).ok())
        .is_none_or(|_| !found.is_empty())
}

/// Takes the exclusive page at `page` back for the CPU (its holder is told
/// first). `Err` if a device's callback could not run without blocking.
pub(crate) fn revoke(
    shared: &Shared,
    page: PageRange,
    owner: Owner,
    hold: u64,
    blockable: bool,
) -> Result<(), ()> {
    let mut notify = NotifierRange::new(page, NotifyEvent::Exclusive);
    notify.blockable = blockable;
    let guard = shared.notifiers.invalidate_start(&notify).map_err(|_| ())?;
    let Ok(staging) = shared.staging() else {
        return Err(());
    };
    {
        let mut regions = lock(&shared.regions);
        if regions.states.get(page.start()) != Stored::Exclusive(owner, hold) {
            // Someone else took it back (or it was unmapped).
            return Ok(());
        }
        // Claimed: a second revoker (or a fault) now waits.
        let _ = regions.states.set(page.start(), Stored::Migrating(owner));
    }
    let slot = staging.page_at(hold);
    let res = shared.move_pages(page, slot, MoveMode::empty());
    let moved = matches!(res, Ok(p) if p.is_complete());
    if !moved && slot_holds_page(shared, slot) {
        // The page is still in its slot (the move failed for another
        // reason): never replace it with zeros; try again later.
        let mut regions = lock(&shared.regions);
        if regions.states.get(page.start()) == Stored::Migrating(owner) {
            let _ = regions
                .states
                .set(page.start(), Stored::Exclusive(owner, hold));
        }
        return Err(());
    }
    if !moved {
        // The slot was empty (the page had been discarded): a zero page.
        let zero = [0u8; PAGE_SIZE];
        match shared
            .uffd
            .copy(page, VirtAddr::from_ptr(zero.as_ptr()), CopyMode::empty())
        {
            Ok(p) if p.stop == Some(Stop::Exists) => {
                let _ = shared.uffd.wake(page);
            }
            _ => {}
        }
    }
    {
        let mut regions = lock(&shared.regions);
        if regions.states.get(page.start()) == Stored::Migrating(owner) {
            let _ = regions.states.set(page.start(), Stored::Cpu);
        }
    }
    staging.unhold(hold, !moved);
    drop(guard);
    Ok(())
}
