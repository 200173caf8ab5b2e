//! [`SimDevice`]: the software device and its mirror commands.

use crate::memory::Arena;
use crate::table::{ATOMIC, DEV, DeviceTable, READ, WRITE};
use rustix::io::Errno;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};
use uhmm::devmem::copy::CpuCopyEngine;
use uhmm::devmem::{DevicePagemap, DevmemError, FaultError, MigrateError, PagemapConfig};
use uhmm::mm::notifier::{IntervalNotifier, NotifierOps, NotifierRange, NotifyEvent, Subscription};
use uhmm::mm::range::{HmmPfn, HmmRange, RangeFaultError};
use uhmm::mm::{ForkedChild, Mm, MmError, Owner};
use uhmm::sys::mem::{self, AccessError, Backing, Mapping, MemError};
use uhmm::{PAGE_SHIFT, PAGE_SIZE, PageRange, RangeError, VirtAddr};

/// How long one device fault keeps retrying when invalidations keep racing
/// with it (the kernel's `HMM_RANGE_DEFAULT_TIMEOUT` is one second).
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Fault rounds after which a command gives up (each round needs an
/// invalidation to have hit the range since the one before).
const MAX_ROUNDS: u64 = 1000;

/// What a command did, with dmirror's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdResult {
    /// Pages copied (read, write) or reported (snapshot).
    pub cpages: u64,
    /// Device-fault *rounds*: each round faults the whole remaining range
    /// in, so a range that was not mirrored reads with `faults == 1`, and
    /// one already mirrored with `faults == 0`. An invalidation between a
    /// round and the copy adds a round.
    pub faults: u64,
}

/// Why a command failed. [`errno`](Self::errno) gives the error the
/// kernel's dmirror returns in the same case.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The address is not page aligned, the page count is zero, or the
    /// range overflows.
    #[error("invalid command range: {0}")]
    Range(#[from] RangeError),
    /// A buffer that is not a whole, non-zero number of pages.
    #[error("buffer of {len} bytes is not a non-zero multiple of the page size")]
    BadBuffer {
        /// Its length.
        len: usize,
    },
    /// The range is not (entirely) managed memory: the device is told of
    /// changes to managed memory only, so it mirrors nothing else.
    #[error("{range} is not (entirely) managed; manage it first (Mm::alloc or Mm::manage)")]
    NotManaged {
        /// The command's range.
        range: PageRange,
    },
    /// A page cannot be accessed: no mapping, `PROT_NONE`, or a special
    /// mapping.
    #[error("device access to {addr} failed: {reason}")]
    Fault {
        /// The first page that failed.
        addr: VirtAddr,
        /// Why.
        reason: &'static str,
    },
    /// A write to read-only memory.
    #[error("device write to read-only memory at {addr}")]
    PermissionDenied {
        /// The page.
        addr: VirtAddr,
    },
    /// Faulting the pages in ran out of memory.
    #[error("out of memory faulting {range} in for the device")]
    NoMemory {
        /// The pages.
        range: PageRange,
    },
    /// Invalidations kept racing with the device's faults for longer than
    /// a second.
    #[error("{range} kept being invalidated; gave up after {rounds} fault rounds")]
    Busy {
        /// The pages.
        range: PageRange,
        /// Rounds tried.
        rounds: u64,
    },
    /// The address space was released (the process is exiting).
    #[error("the address space this device mirrors was released")]
    Released,
    /// Device memory could not be mapped.
    #[error(transparent)]
    Map(#[from] MemError),
    /// The CPU page table could not be read.
    #[error(transparent)]
    PageTable(RangeFaultError),
    /// A page of a migrated range did not end up in this device's memory
    /// (shared memory, a page pinned or on another device, a failed copy).
    #[error("the page at {addr} was not migrated to the device")]
    NotMigrated {
        /// The first such page.
        addr: VirtAddr,
    },
    /// The range cannot be migrated or made exclusive.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// Device memory could not be had.
    #[error(transparent)]
    DeviceMemory(DevmemError),
    /// The device still holds a page exclusive.
    #[error("the device still holds the page at {addr} exclusive")]
    StillExclusive {
        /// The first such page.
        addr: VirtAddr,
    },
    /// Device pages could not be brought home.
    #[error("device memory could not be evicted: {0}")]
    Evict(FaultError),
    /// A command in a forked child, on a device (or an `Mm`) its parent
    /// made: the child makes its own `Mm` and device.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

impl SimError {
    /// The errno dmirror's ioctl returns for the same failure (so that
    /// ported hmm-tests can assert it): EFAULT, EPERM, EINVAL, ENOMEM,
    /// EBUSY, or EIO. Memory uhmm does not manage has no dmirror
    /// counterpart (dmirror mirrors any mapping); it is EINVAL, a bad
    /// command, as is a command after Release, or in a forked child.
    pub fn errno(&self) -> Errno {
        match self {
            SimError::Range(_)
            | SimError::BadBuffer { .. }
            | SimError::NotManaged { .. }
            | SimError::Released
            | SimError::ForkedChild(_)
            | SimError::Migrate(MigrateError::Mm(MmError::ForkedChild(_)))
            | SimError::DeviceMemory(DevmemError::ForkedChild(_))
            | SimError::Evict(FaultError::ForkedChild(_)) => Errno::INVAL,
            SimError::Fault { .. } => Errno::FAULT,
            SimError::PermissionDenied { .. } => Errno::PERM,
            SimError::NoMemory { .. } => Errno::NOMEM,
            SimError::Busy { .. } => Errno::BUSY,
            SimError::NotMigrated { .. } => Errno::NOENT,
            SimError::Migrate(MigrateError::InvalidRange { .. }) => Errno::INVAL,
            SimError::Migrate(MigrateError::Retry { .. }) => Errno::BUSY,
            SimError::DeviceMemory(_) => Errno::NOMEM,
            SimError::StillExclusive { .. } => Errno::PERM,
            SimError::Map(_)
            | SimError::PageTable(_)
            | SimError::Migrate(_)
            | SimError::Evict(_) => Errno::IO,
        }
    }
}

/// What a device has counted (cheap atomics, read as a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimStats {
    /// `read` commands run.
    pub reads: u64,
    /// `write` commands run.
    pub writes: u64,
    /// `snapshot` commands run.
    pub snapshots: u64,
    /// Device-fault rounds.
    pub fault_rounds: u64,
    /// Pages copied by reads and writes.
    pub pages_copied: u64,
    /// Invalidations that hit the device's notifier.
    pub invalidations: u64,
    /// Translations those invalidations removed.
    pub translations_dropped: u64,
    /// Invalidations the device asked to retry (its table was busy and the
    /// caller could not block).
    pub invalidations_deferred: u64,
    /// Pages migrated into device memory.
    pub migrated_to_device: u64,
    /// Pages migrated back to system memory (commands, CPU faults,
    /// evictions).
    pub migrated_to_system: u64,
    /// Of those, pages brought back by CPU faults and evictions.
    pub faulted_back: u64,
    /// Device pages freed (unmapped, discarded, or back in system memory).
    pub pages_freed: u64,
    /// Bulk allocations that failed (FAIL_ALLOC) and fell back to single
    /// pages.
    pub alloc_fallbacks: u64,
    /// Migrations whose copy failed (nothing of them migrated).
    pub copy_failures: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    snapshots: AtomicU64,
    fault_rounds: AtomicU64,
    pages_copied: AtomicU64,
    invalidations: AtomicU64,
    translations_dropped: AtomicU64,
    invalidations_deferred: AtomicU64,
    pub(crate) migrated_to_device: AtomicU64,
    pub(crate) migrated_to_system: AtomicU64,
    pub(crate) faulted_back: AtomicU64,
    pub(crate) pages_freed: AtomicU64,
    pub(crate) alloc_fallbacks: AtomicU64,
    pub(crate) copy_failures: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The device side the notifier and the fault service call into: its page
/// table under its lock, and its memory.
#[derive(Debug)]
pub(crate) struct Mirror {
    owner: Owner,
    pub(crate) table: Mutex<DeviceTable>,
    released: AtomicBool,
    pub(crate) counters: Counters,
    pub(crate) arena: Arena,
}

impl Mirror {
    pub(crate) fn lock(&self) -> MutexGuard<'_, DeviceTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NotifierOps for Mirror {
    fn invalidate(&self, sub: &Subscription, r: &NotifierRange, cur_seq: u64) -> bool {
        // Its own exclusive grab programs the range's translations after
        // (the kernel's drivers skip this event and keep their sequence:
        // the grab's own `read_retry` must pass). Unlike a kernel device,
        // which reaches the page through its pfn, this one reaches system
        // pages through their virtual addresses, and the grab moves the
        // page to a staging slot: an access of its own in progress there
        // is waited for (the table lock), and the translations go. The
        // same for its own migrations.
        let own_grab = r.event == NotifyEvent::Exclusive && r.owner == Some(self.owner);
        let mut table = if r.blockable {
            self.lock()
        } else {
            match self.table.try_lock() {
                Ok(t) => t,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    bump(&self.counters.invalidations_deferred, 1);
                    return false;
                }
            }
        };
        if !own_grab {
            sub.set_seq(cur_seq);
        }
        // Its own migrations: pages in its memory stay its own (a
        // migration back drops their translations itself); translations
        // of system pages go, as those pages leave the page table.
        let dropped = if r.event == NotifyEvent::Migrate && r.owner == Some(self.owner) {
            table.clear_where(r.range, |e| e & DEV == 0)
        } else {
            table.clear(r.range)
        };
        if r.event == NotifyEvent::Release {
            self.released.store(true, Ordering::Release);
        }
        drop(table);
        bump(&self.counters.invalidations, 1);
        bump(&self.counters.translations_dropped, dropped as u64);
        true
    }
}

/// A software device that mirrors the process's address space, like the
/// kernel's `dmirror`: its own page table (virtual page → read or write
/// permission), an interval notifier over the whole address space that
/// drops translations as they are invalidated, and the mirror commands
/// [`read`](Self::read), [`write`](Self::write) and
/// [`snapshot`](Self::snapshot).
///
/// The device reaches system memory through the process's virtual
/// addresses (an SVA-style device) with fault-tolerant accessors, always
/// under its table lock and only through a translation: a stale one (say,
/// after a protection change uhmm could not see) makes the access fail, the
/// translation is dropped and re-faulted, and the command reports the
/// fault — the process never crashes. Under that lock it touches only
/// pages the CPU page table holds (a CPU fault served there may need this
/// very device's invalidation callback); a page gone from it is faulted in
/// again with the lock released.
///
/// A device belongs to the process that made it, with its `Mm`: in a
/// forked child every command returns [`SimError::ForkedChild`] (EINVAL),
/// and dropping it there leaves the parent's address space alone. The child
/// makes its own `Mm` and device.
///
/// ```
/// use uhmm::mm::Mm;
/// use uhmm::sys::mem::Backing;
/// use uhmm::PAGE_SIZE;
/// use uhmm_sim::{SimDevice, prot};
///
/// let mm = Mm::new()?;
/// let region = mm.alloc(4 * PAGE_SIZE, Backing::AnonPrivate)?;
/// region.write_at(0, b"from the CPU")?;
/// let dev = SimDevice::new(&mm);
///
/// // The first read faults the whole range in, in one round.
/// let (data, res) = dev.read(region.range().start(), 4)?;
/// assert_eq!((res.cpages, res.faults), (4, 1));
/// assert_eq!(&data[..12], b"from the CPU");
/// // Now it is mirrored: no fault.
/// assert_eq!(dev.read(region.range().start(), 4)?.1.faults, 0);
///
/// // The device writes; the CPU sees it.
/// dev.write(region.range().start(), &[7u8; PAGE_SIZE])?;
/// let mut b = [0u8; 1];
/// region.read_at(0, &mut b)?;
/// assert_eq!(b[0], 7);
///
/// // What the device sees of the CPU page table, one byte per page: page 0
/// // written, pages 1-3 only read (the zero page).
/// let (snap, _) = dev.snapshot(region.range().start(), 4)?;
/// let zero = prot::ZERO | prot::READ;
/// assert_eq!(snap, [prot::WRITE, zero, zero, zero]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SimDevice {
    // Dropped first: its pages come home while the device still works.
    pub(crate) pagemap: DevicePagemap,
    pub(crate) mm: Mm,
    pub(crate) mirror: Arc<Mirror>,
    pub(crate) notifier: IntervalNotifier,
}

impl SimDevice {
    /// A new device (a new [`Owner`]) mirroring `mm`'s address space, with
    /// up to 16 GiB of device memory in 256 MiB chunks (backed as used).
    ///
    /// # Panics
    ///
    /// In a forked child, with an `mm` its parent made
    /// ([`with_memory`](Self::with_memory) returns the error instead).
    pub fn new(mm: &Mm) -> SimDevice {
        match Self::with_memory(mm, PagemapConfig::default()) {
            Ok(dev) => dev,
            Err(SimError::ForkedChild(e)) => panic!("{e}"),
            Err(_) => unreachable!("a new owner with the default configuration"),
        }
    }

    /// A new device with device memory as `config` says (a small one to
    /// see it run out, say).
    ///
    /// # Errors
    ///
    /// [`SimError::DeviceMemory`] with [`DevmemError::BadConfig`] if
    /// `config` is out of bounds ([`PagemapConfig::validate`]);
    /// [`SimError::ForkedChild`] in a forked child, with an `mm` its parent
    /// made.
    pub fn with_memory(mm: &Mm, config: PagemapConfig) -> Result<SimDevice, SimError> {
        mm.check_process()?;
        config.validate().map_err(SimError::DeviceMemory)?;
        let owner = Owner::unique();
        let mirror = Arc::new(Mirror {
            owner,
            table: Mutex::new(DeviceTable::default()),
            released: AtomicBool::new(false),
            counters: Counters::default(),
            arena: Arena::new(config.chunk_pages, Arc::new(CpuCopyEngine::new())),
        });
        let everything = PageRange::new(VirtAddr::new(0), usize::MAX - PAGE_SIZE + 1)
            .unwrap_or_else(|_| unreachable!("the whole address space is a valid range"));
        let notifier = mm
            .insert_notifier(everything, mirror.clone())
            .map_err(|e| match e {
                MmError::ForkedChild(f) => SimError::ForkedChild(f),
                e => unreachable!("inserting a notifier fails in a forked child only: {e}"),
            })?;
        let pagemap = DevicePagemap::new(mm, owner, mirror.clone(), config)
            .map_err(SimError::DeviceMemory)?;
        Ok(SimDevice {
            pagemap,
            mm: mm.clone(),
            mirror,
            notifier,
        })
    }

    /// The device's identity.
    pub fn owner(&self) -> Owner {
        self.mirror.owner
    }

    /// The address space it mirrors.
    pub fn mm(&self) -> &Mm {
        &self.mm
    }

    /// Translations the device holds now.
    pub fn mirrored_pages(&self) -> usize {
        self.mirror.lock().len()
    }

    /// What the device has counted.
    pub fn stats(&self) -> SimStats {
        let c = &self.mirror.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            reads: l(&c.reads),
            writes: l(&c.writes),
            snapshots: l(&c.snapshots),
            fault_rounds: l(&c.fault_rounds),
            pages_copied: l(&c.pages_copied),
            invalidations: l(&c.invalidations),
            translations_dropped: l(&c.translations_dropped),
            invalidations_deferred: l(&c.invalidations_deferred),
            migrated_to_device: l(&c.migrated_to_device),
            migrated_to_system: l(&c.migrated_to_system),
            faulted_back: l(&c.faulted_back),
            pages_freed: l(&c.pages_freed),
            alloc_fallbacks: l(&c.alloc_fallbacks),
            copy_failures: l(&c.copy_failures),
        }
    }

    /// The device reads `npages` pages from `addr` (`HMM_DMIRROR_READ`),
    /// faulting in what it does not mirror yet.
    ///
    /// # Errors
    ///
    /// See [`read_into`](Self::read_into).
    pub fn read(&self, addr: VirtAddr, npages: usize) -> Result<(Vec<u8>, CmdResult), SimError> {
        let range = command_range(addr, npages)?;
        let mut data = vec![0u8; range.len()];
        let res = self.read_into(addr, &mut data)?;
        Ok((data, res))
    }

    /// The device reads `buf.len()` bytes (whole pages) from `addr` into
    /// `buf`. On error, `buf` may hold the pages read before the failure.
    ///
    /// # Errors
    ///
    /// [`SimError::Range`]/[`BadBuffer`](SimError::BadBuffer) for a bad
    /// command, [`SimError::NotManaged`] for memory uhmm does not manage,
    /// [`SimError::Fault`] for unmapped or `PROT_NONE` memory,
    /// [`SimError::Busy`] if invalidations never let it finish.
    pub fn read_into(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<CmdResult, SimError> {
        let range = self.command(addr, buf.len())?;
        bump(&self.mirror.counters.reads, 1);
        self.transfer(range, false, |page, offset, len| {
            mem::read_process(page, &mut buf[offset..offset + len])
        })
    }

    /// The device writes `data` (whole pages) to `addr`
    /// (`HMM_DMIRROR_WRITE`), write-faulting what it does not hold
    /// writable.
    ///
    /// # Errors
    ///
    /// As [`read_into`](Self::read_into), and
    /// [`SimError::PermissionDenied`] for read-only memory (nothing is
    /// written then).
    #[allow(unsafe_code)] // named place: the device's DMA into managed memory
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<CmdResult, SimError> {
        let range = self.command(addr, data.len())?;
        bump(&self.mirror.counters.writes, 1);
        self.transfer(range, true, |page, offset, len| {
            // SAFETY: `page` lies in managed memory: the device holds a
            // translation for it, made by a fault that found the range
            // managed under the table lock held here, and a region stops
            // being managed only by an invalidation, which needs this lock
            // to remove the translation. Managed memory has no Rust
            // references into it (the contract of `Mm::alloc`'s regions
            // and of `Mm::manage`), so writing it breaks none. (A raw
            // munmap of managed memory, which uhmm learns of only after
            // the fact, is outside those contracts. So is, for now, an
            // mremap of a managed mapping while the device accesses it:
            // until the move's event reaches the notifier, memory another
            // thread maps at the old place is written here. An open hole:
            // DESIGN.md, "Devices that misbehave".) A page in device
            // memory is written in the device's arena, and a page held
            // exclusive in its staging slot: no references point into
            // either, the translation (checked under this lock) says the
            // page is still there, and neither is handed out again before
            // this device's invalidation ran.
            unsafe { mem::write_process(page, &data[offset..offset + len]) }
        })
    }

    /// One byte per page describing the CPU page table as the device would
    /// see it (`HMM_DMIRROR_SNAPSHOT`), in the [`prot`](crate::prot)
    /// encoding, without faulting anything in. Works on any memory, managed
    /// or not.
    ///
    /// # Errors
    ///
    /// [`SimError::Range`] for a bad command, [`SimError::Busy`] if
    /// invalidations never let it finish.
    pub fn snapshot(
        &self,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<(Vec<u8>, CmdResult), SimError> {
        let range = command_range(addr, npages)?;
        self.mm.check_process()?;
        self.check_released()?;
        bump(&self.mirror.counters.snapshots, 1);
        self.with_entries(range, HmmPfn::NONE, 0, |_, pfns| {
            let bytes = pfns.iter().map(|&p| self.encode(p)).collect();
            let res = CmdResult {
                cpages: npages as u64,
                faults: 0,
            };
            Ok((bytes, res))
        })
    }

    /// Maps `npages` zeroed pages of memory the device provides, as
    /// dmirror's `mmap` does: a private mapping whose pages are present but
    /// read-only until the CPU writes them (the userspace analogue of pages
    /// inserted with `vm_insert_page`). uhmm does not manage it.
    ///
    /// # Errors
    ///
    /// [`SimError::Map`] if the memory cannot be made.
    pub fn mmap(&self, npages: usize) -> Result<Mapping, SimError> {
        let len = npages
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0)
            .ok_or(SimError::BadBuffer { len: 0 })?;
        let memfd_error = |errno| SimError::Map(MemError::Memfd { len, errno });
        let fd = rustix::fs::memfd_create("uhmm-sim", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(memfd_error)?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(memfd_error)?;
        let mapping = Mapping::builder(len)
            .backing(Backing::File {
                fd,
                offset: 0,
                shared: false,
            })
            .build()?;
        mem::populate(mapping.range(), false)?;
        Ok(mapping)
    }

    pub(crate) fn check_released(&self) -> Result<(), SimError> {
        if self.mirror.released.load(Ordering::Acquire) {
            Err(SimError::Released)
        } else {
            Ok(())
        }
    }

    /// Validates a read or write command over `len` bytes at `addr`.
    pub(crate) fn command(&self, addr: VirtAddr, len: usize) -> Result<PageRange, SimError> {
        if len == 0 || len % PAGE_SIZE != 0 {
            return Err(SimError::BadBuffer { len });
        }
        let range = command_range(addr, len / PAGE_SIZE)?;
        self.mm.check_process()?;
        self.check_released()?;
        if !self.mm.is_managed(range) {
            return Err(SimError::NotManaged { range });
        }
        Ok(range)
    }

    /// dmirror's copy loop: under the table lock, copy the run of pages the
    /// device holds (writable, for a write); at the first page it does not
    /// hold, fault the whole rest of the range in (one round) and go on.
    fn transfer(
        &self,
        range: PageRange,
        write: bool,
        mut copy: impl FnMut(VirtAddr, usize, usize) -> Result<(), AccessError>,
    ) -> Result<CmdResult, SimError> {
        let need = if write { READ | WRITE } else { READ };
        let mut res = CmdResult::default();
        let mut cursor = range.start();
        // Where the last copy failed: failing there again right after a
        // fault round said the page is fine is a real error, not a race.
        let mut failed_at = None;
        loop {
            {
                let mut table = self.mirror.lock();
                self.check_released()?;
                while cursor < range.end() {
                    let run = table.run(cursor, range.end(), need);
                    if run == 0 {
                        break;
                    }
                    // Where the pages are: their virtual addresses, or the
                    // device's memory, or the slots of exclusive pages —
                    // as many as lie at consecutive addresses.
                    let (at, mut run) = self.locate(&table, cursor, run);
                    let Some(at) = at else {
                        // A device page the address space no longer records:
                        // stale. Drop and fault.
                        table.set(cursor, 0);
                        break;
                    };
                    if at == cursor {
                        // System pages are reached through the CPU page
                        // table, which must not make this access wait in
                        // a CPU fault with the table lock held: serving it
                        // may need this device's invalidation callback
                        // (another device's exclusive page, say, whose
                        // holder waits on this lock the same way). Only
                        // pages in the page table are accessed; a page
                        // gone from it (discarded, or in flight) is a
                        // stale translation: drop it and fault, unlocked.
                        run = self.mirror.arena.present_prefix(at, run);
                        if run == 0 {
                            table.set(cursor, 0);
                            break;
                        }
                    }
                    let offset = cursor.get() - range.start().get();
                    let (done, failed) = match copy(at, offset, run * PAGE_SIZE) {
                        Ok(()) => (run, false),
                        Err(e) => (e.done / PAGE_SIZE, true),
                    };
                    res.cpages += done as u64;
                    cursor = VirtAddr::new(cursor.get() + done * PAGE_SIZE);
                    if failed {
                        if failed_at == Some(cursor) {
                            return Err(SimError::Fault {
                                addr: cursor,
                                reason: "the device access failed where the CPU page table allows it",
                            });
                        }
                        // A stale translation: the page changed in a way the
                        // notifier has not reported yet. Drop it and fault.
                        failed_at = Some(cursor);
                        table.set(cursor, 0);
                        break;
                    }
                }
            }
            if cursor >= range.end() {
                bump(&self.mirror.counters.pages_copied, res.cpages);
                return Ok(res);
            }
            let rest = PageRange::from_bounds(cursor, range.end())?;
            if res.faults >= MAX_ROUNDS {
                return Err(SimError::Busy {
                    range,
                    rounds: res.faults,
                });
            }
            self.fault(rest, write, res.faults)?;
            res.faults += 1;
            bump(&self.mirror.counters.fault_rounds, 1);
        }
    }

    /// Where the `run` pages from `cursor` that the device holds can be
    /// reached, and how many of them lie at consecutive addresses there.
    fn locate(
        &self,
        table: &DeviceTable,
        cursor: VirtAddr,
        run: usize,
    ) -> (Option<VirtAddr>, usize) {
        let at = |addr: VirtAddr| -> Option<VirtAddr> {
            let e = table.get(addr);
            if e & DEV != 0 {
                let pfn = self.mm.device_page(addr, self.owner())?;
                self.mirror.arena.addr(pfn)
            } else if e & ATOMIC != 0 {
                self.mm.exclusive_page(addr, self.owner())
            } else {
                Some(addr)
            }
        };
        let Some(first) = at(cursor) else {
            return (None, 0);
        };
        let mut n = 1;
        while n < run {
            let addr = VirtAddr::new(cursor.get() + n * PAGE_SIZE);
            if at(addr) != first.checked_add(n * PAGE_SIZE) {
                break;
            }
            n += 1;
        }
        (Some(first), n)
    }

    /// One device-fault round (dmirror_fault): fault `range` in and record
    /// the translations.
    fn fault(&self, range: PageRange, write: bool, rounds: u64) -> Result<(), SimError> {
        let request = if write {
            HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE
        } else {
            HmmPfn::REQ_FAULT
        };
        self.with_entries(range, request, rounds, |table, pfns| {
            // No invalidation since read_begin, and any later one waits for
            // this lock: the state checked now holds while the entries are
            // used. A region leaves the managed set inside its Unmap
            // invalidation, and Release ends all use.
            self.check_released()?;
            if !self.mm.is_managed(range) {
                return Err(SimError::NotManaged { range });
            }
            for (addr, &pfn) in range.pages().zip(pfns) {
                let granted_write = pfn.contains(HmmPfn::WRITE);
                if !pfn.contains(HmmPfn::VALID) || (write && !granted_write) {
                    return Err(SimError::Fault {
                        addr,
                        reason: "range_fault did not grant the access",
                    });
                }
                let w = if granted_write { WRITE } else { 0 };
                let dev = if pfn.device_pfn().is_some() { DEV } else { 0 };
                table.set(addr, READ | w | dev);
            }
            Ok(())
        })
    }

    /// The mirror protocol (Documentation/mm/hmm.rst): `read_begin`,
    /// `range_fault` with `request` for every page, take the table lock,
    /// and if no invalidation raced (`read_retry`), hand the entries to
    /// `use_entries` under the lock; otherwise start again, for up to
    /// [`BUSY_TIMEOUT`].
    fn with_entries<T>(
        &self,
        range: PageRange,
        request: HmmPfn,
        rounds: u64,
        use_entries: impl FnOnce(&mut DeviceTable, &[HmmPfn]) -> Result<T, SimError>,
    ) -> Result<T, SimError> {
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            // Its own grab of the range in progress: wait for it first (a
            // fault would take the pages it is grabbing back from it).
            if self
                .mirror
                .lock()
                .grabbing
                .iter()
                .any(|g| g.overlaps(range))
            {
                if Instant::now() >= deadline {
                    return Err(SimError::Busy { range, rounds });
                }
                std::thread::yield_now();
                continue;
            }
            let seq = self.notifier.read_begin();
            let mut r = HmmRange::new(&self.notifier, seq, range);
            r.default_flags = request;
            r.dev_private_owner = Some(self.owner());
            match self.mm.range_fault(&mut r) {
                Ok(()) => {}
                Err(RangeFaultError::Busy { .. }) if Instant::now() < deadline => continue,
                Err(e) => return Err(range_error(e, range, rounds)),
            }
            let mut table = self.mirror.lock();
            let grabbing = table.grabbing.iter().any(|g| g.overlaps(range));
            if self.notifier.read_retry(seq) || grabbing {
                if Instant::now() >= deadline {
                    return Err(SimError::Busy { range, rounds });
                }
                drop(table);
                if grabbing {
                    std::thread::yield_now();
                }
                continue;
            }
            return use_entries(&mut table, &r.pfns);
        }
    }

    /// dmirror_mkentry: an entry in the snapshot byte encoding.
    fn encode(&self, pfn: HmmPfn) -> u8 {
        use crate::prot;
        if pfn.contains(HmmPfn::ERROR) {
            return prot::ERROR;
        }
        if !pfn.contains(HmmPfn::VALID) {
            return prot::NONE;
        }
        let mut b = if pfn.contains(HmmPfn::DEVICE_PRIVATE) {
            prot::DEV_PRIVATE_LOCAL
        } else if pfn.contains(HmmPfn::ZERO) {
            prot::ZERO
        } else {
            prot::NONE
        };
        b |= if pfn.contains(HmmPfn::WRITE) {
            prot::WRITE
        } else {
            prot::READ
        };
        match pfn.order() + PAGE_SHIFT {
            21 => b |= prot::PMD,
            30 => b |= prot::PUD,
            _ => {}
        }
        b
    }
}

pub(crate) fn command_range(addr: VirtAddr, npages: usize) -> Result<PageRange, SimError> {
    let len = npages.checked_mul(PAGE_SIZE).ok_or(RangeError::Overflow {
        start: addr,
        len: usize::MAX,
    })?;
    Ok(PageRange::new(addr, len)?)
}

fn range_error(e: RangeFaultError, range: PageRange, rounds: u64) -> SimError {
    match e {
        RangeFaultError::Busy { .. } => SimError::Busy { range, rounds },
        RangeFaultError::Fault { addr, reason } => SimError::Fault { addr, reason },
        RangeFaultError::PermissionDenied { addr } => SimError::PermissionDenied { addr },
        RangeFaultError::NoMemory { range } => SimError::NoMemory { range },
        RangeFaultError::ForkedChild(f) => SimError::ForkedChild(f),
        e => SimError::PageTable(e),
    }
}
