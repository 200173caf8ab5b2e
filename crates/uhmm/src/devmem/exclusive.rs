//! Exclusive access for device atomics (the kernel's
//! `make_device_exclusive`).
//!
//! A page made exclusive to a device leaves the CPU page table for a slot
//! of uhmm's staging area, where the device uses it; the CPU's next access
//! to it (a read, a write, or a system call on its behalf) revokes the
//! exclusivity — the device is told by an [`NotifyEvent::Exclusive`]
//! invalidation with no owner — and the page, with whatever the device
//! wrote, comes back.

use super::migrate::{MigrateError, SETUP_ATTEMPTS};
use super::staging::{BLOCK, Left};
use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::mm::notifier::{NotifierRange, NotifyEvent};
use crate::mm::service::Shared;
use crate::mm::state::{OpId, Stored};
use crate::mm::{Mm, MmError, Owner, lock_poisoned as lock};
use crate::sys::mem::Prot;
use crate::sys::procmap::VmaKind;
use crate::sys::uffd::{CopyMode, MoveMode, OpError, Progress, Stop};

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
    /// faulted in, or with [`MmError::ForkedChild`] in a forked child.
    pub fn make_device_exclusive(
        &self,
        range: PageRange,
        owner: Owner,
    ) -> Result<usize, MigrateError> {
        self.check_process().map_err(MmError::from)?;
        let shared = self.shared();
        let invalid = |reason| MigrateError::InvalidRange { range, reason };
        for attempt in 1.. {
            let region = lock(&shared.regions)
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
            let retry = attempt < SETUP_ATTEMPTS;
            match shared.arm_once(region) {
                Ok(()) => {}
                // Replaced meanwhile: look again.
                Err(MmError::NotManaged { .. }) if retry => continue,
                Err(e) => return Err(e.into()),
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
                    shared.fault_in(gap, true).map_err(MmError::from)?;
                }
                cursor = a.checked_add(PAGE_SIZE).unwrap_or(range.end());
            }
            if !shared.gate.enter(true) {
                return Err(MigrateError::Retry { range });
            }
            let result = grab(shared, range, owner, region.id);
            shared.gate.leave();
            shared.poke();
            match result {
                // Dropped and mapped anew since it was armed: look again.
                Err(MigrateError::Retry { .. }) if retry => continue,
                r => return r,
            }
        }
        Err(MigrateError::Retry { range })
    }

    /// Where the device holding `addr`'s page exclusive finds it: a slot
    /// of uhmm's staging area, valid until the page's next invalidation
    /// (never, in a forked child: a fork brings every page home first).
    pub fn exclusive_page(&self, addr: VirtAddr, owner: Owner) -> Option<VirtAddr> {
        self.check_process().ok()?;
        let shared = self.shared();
        match lock(&shared.regions).states.get(addr.page_down()) {
            Stored::Exclusive(o, hold) if o == owner => Some(shared.staging().ok()?.page_at(hold)),
            _ => None,
        }
    }
}

/// Grabs `range` in the region `region` (its id) if it is still there.
fn grab(
    shared: &Shared,
    range: PageRange,
    owner: Owner,
    region: u64,
) -> Result<usize, MigrateError> {
    let op = {
        let mut regions = lock(&shared.regions);
        match regions.containing(range) {
            Some(r) if r.id != region || !r.armed => return Err(MigrateError::Retry { range }),
            Some(r) if !regions.closing(r.id, range) => regions
                .begin_op(owner, range)
                .map_err(|e| MigrateError::Mm(MmError::State(e)))?,
            _ => {
                return Err(MigrateError::InvalidRange {
                    range,
                    reason: "not inside one managed region",
                });
            }
        }
    };
    let result = grab_in(shared, range, owner, op);
    shared.end_op(op);
    result
}

/// Moves each page of `range` that is the CPU's into its staging slot and
/// records it exclusive to `owner` — in that order, under the regions lock,
/// so that no fault can find the page exclusive before it is in its slot.
fn grab_in(
    shared: &Shared,
    range: PageRange,
    owner: Owner,
    op: OpId,
) -> Result<usize, MigrateError> {
    let notify = NotifierRange::new(range, NotifyEvent::Exclusive).with_owner(owner);
    let _guard = shared
        .notifiers
        .invalidate_start(&notify)
        .map_err(|_| MigrateError::Retry { range })?;
    let staging = shared.staging()?;
    let run = staging.alloc(range, super::staging::Want::Empty, true, false)?;
    let mut count = 0;
    let mut todo: Vec<VirtAddr> = range.pages().collect();
    // Bounded by time, not rounds: a page fenced by a discard (whose zap
    // may still come) is waited for until its fence goes, which may take
    // up to the fence's lifetime when the CPU refilled the page without a
    // fault reaching uhmm; rounds with nothing pending pass in
    // microseconds.
    let deadline = std::time::Instant::now() + crate::mm::regions::FENCE_TTL * 2;
    let mut rounds = 0u32;
    loop {
        let mut left = Vec::new();
        {
            let mut regions = lock(&shared.regions);
            for &addr in &todo {
                // Moved meanwhile, or gone (other memory may be there now).
                let Some(at) = regions.op(op).and_then(|o| o.follow(addr)) else {
                    continue;
                };
                if PageRange::new(at, PAGE_SIZE)
                    .ok()
                    .and_then(|p| regions.containing(p))
                    .is_none()
                {
                    continue;
                }
                match regions.states.get(at) {
                    // A discard is about to zap it: not now.
                    Stored::Cpu if regions.zap_pending(at) => {
                        left.push(addr);
                        continue;
                    }
                    Stored::Cpu => {}
                    Stored::Exclusive(o, _) if o == owner => {
                        count += 1;
                        continue;
                    }
                    _ => continue,
                }
                let (Ok(slot), Ok(page)) = (
                    PageRange::new(staging.slot(&run, addr), PAGE_SIZE),
                    PageRange::new(at, PAGE_SIZE),
                ) else {
                    continue;
                };
                // Never with ALLOW_SRC_HOLES (see `migrate::MOVE_QUIRK`).
                let res = match shared.move_held(slot, page.start(), MoveMode::DONTWAKE) {
                    // Nothing to move: a hole (discarded since the look),
                    // taken as it is.
                    Ok(p) if p.stop == Some(Stop::NoEntry) => Ok(Progress {
                        done: PAGE_SIZE,
                        stop: None,
                    }),
                    res => res,
                };
                match res {
                    Ok(p) if p.is_complete() => {
                        let hold = staging.page_number(slot.start());
                        if regions
                            .states
                            .set(at, Stored::Exclusive(owner, hold))
                            .is_ok()
                        {
                            staging.hold(hold);
                            count += 1;
                        } else {
                            // Cannot be recorded: put it straight back.
                            // (Not reached: the operation reserved the
                            // owner's name in the state table, and a slot
                            // number is far below the largest a state
                            // holds. Were it reached, a move answered
                            // EAGAIN would leave the page in its slot.)
                            let _ = shared.move_held(page, slot.start(), MoveMode::empty());
                        }
                    }
                    Ok(p) if p.stop == Some(Stop::LayoutChanging) => left.push(addr),
                    // Could not be taken (pinned, say): it stays the CPU's.
                    _ => {}
                }
            }
        }
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        shared.await_events();
        rounds += 1;
        if rounds > 100 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        todo = left;
    }
    // What the slots hold, as the page table says: a page whose hold an
    // unmap or discard dropped between the rounds stays in its slot, and
    // a run freed clean would hand that block out for moving pages in
    // (`Want::Empty`), where a move's answer is checked against what the
    // slot holds (`Shared::move_held`). Block by block, so that a
    // block with nothing left stays clean. Never emptied here: the blocks
    // may hold other pages held exclusive.
    let left: Vec<Left> = match shared.pagemap().ok().and_then(|pm| staging.held(pm, &run)) {
        Some(held) => held
            .iter()
            .map(|&(pages, _)| match pages {
                0 => Left::Empty { flat: false },
                _ => Left::Pages,
            })
            .collect(),
        // (Cannot be looked at: every block may hold pages.)
        None => vec![Left::Pages; run.span().len() / BLOCK],
    };
    staging.free_blocks(run, &left, false);
    Ok(count)
}

/// Where a revoked page stands after one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Back {
    /// In place (or nothing was there to put back).
    Done,
    /// A mapping is changing: try again once pending events are applied.
    Later,
    /// It cannot be put back.
    Lost,
}

impl Back {
    fn of(stop: Option<Stop>) -> Back {
        match stop {
            None | Some(Stop::Exists) => Back::Done,
            Some(Stop::LayoutChanging | Stop::Partial) => Back::Later,
            Some(_) => Back::Lost,
        }
    }
}

/// Takes the exclusive page at `page` back for the CPU (its holder is told
/// first). `Err` if a device's callback could not run without blocking, or
/// (not blockable) the page could not be moved back yet.
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
    let slot = staging.page_at(hold);
    let mut wait = crate::mm::service::LayoutWait::default();
    while wait.reads() < 1000 {
        {
            let mut regions = lock(&shared.regions);
            if regions.states.get(page.start()) != Stored::Exclusive(owner, hold) {
                // Someone else took it back (or it was unmapped).
                return Ok(());
            }
            // The slot's page goes back into place: moved, or copied where
            // the mapping does not take MOVE any more (made read-only
            // since) or the page is shared or pinned. A slot the page was
            // discarded from is a hole: nothing to put back.
            let moved = match shared.move_held(page, slot, MoveMode::DONTWAKE) {
                Err(OpError::Invalid { .. }) => None,
                Ok(p) if p.stop == Some(Stop::Busy) => None,
                // Nothing to move: a hole in the slot (the page was
                // discarded from it), or a page in place already.
                Ok(p) if p.stop == Some(Stop::NoEntry) => Some(Back::Done),
                Ok(p) => Some(Back::of(p.stop)),
                Err(_) => Some(Back::Lost),
            };
            let back = moved.unwrap_or_else(|| {
                if shared.page_present(slot) == Some(false) {
                    return Back::Done;
                }
                // (A mapping that moved or went away since the look at
                // the states: the kernel refuses the copy with EAGAIN
                // until its event is read, which waits for this lock.)
                crate::testing::revoke_copy();
                match shared.uffd.copy(page, slot, CopyMode::DONTWAKE) {
                    Ok(p) => Back::of(p.stop),
                    Err(_) => Back::Lost,
                }
            });
            // An empty slot is a page that left it, whatever the kernel
            // answered (`migrate::MOVE_QUIRK`: a move may put the page in
            // place and answer EAGAIN, counting nothing, when another
            // thread's mremap or munmap is raised meanwhile), or a hole
            // the grab took (a discard raced it), which reads zeros
            // either way. The page is the CPU's now, at `page` or wherever
            // that mremap takes its mapping, which carries the state set
            // here along. Trying again instead would find the state gone
            // from `page` once the mremap is applied, and leave the page
            // recorded exclusive at its new address with nothing in its
            // slot. (Only this lock's holders move pages in or out of a
            // held slot, which is never emptied or handed out while held;
            // a copy leaves it full; a swapped page counts as present.)
            let back = match back {
                Back::Later | Back::Lost if shared.page_present(slot) == Some(false) => Back::Done,
                back => back,
            };
            if back == Back::Lost {
                // It cannot be put back: lost (SIGBUS on access), never
                // zeros.
                shared.lose_locked(&mut regions, page);
            }
            let done = back != Back::Later;
            if done {
                if back != Back::Lost {
                    let _ = regions.states.set(page.start(), Stored::Cpu);
                }
                drop(regions);
                staging.unhold(hold, true);
                let _ = shared.uffd.wake(page);
                drop(guard);
                return Ok(());
            }
        }
        if !blockable {
            return Err(());
        }
        // Refused while the layout changes: tried again in the window the
        // changing thread leaves (see `LayoutWait`).
        shared.layout_wait(&mut wait);
    }
    Err(())
}
