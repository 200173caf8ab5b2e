//! A minimal device of its own, on uhmm's public traits only: a page
//! table kept coherent by an interval notifier and filled by `range_fault`,
//! device memory behind a `DevicePagemap`, and migration both ways with
//! its own copy engine. Run it with
//! `cargo run -p uhmm --example mini_device` (root, or a userfaultfd that
//! serves kernel faults).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use uhmm::devmem::copy::{CopyEngine, CopyError, CopyJob};
use uhmm::devmem::{
    DeviceFault, DevicePagemap, DevicePagemapOps, DevmemError, FaultError, MigrateSrc, MigrateVma,
    PagemapConfig, Select,
};
use uhmm::mm::notifier::{IntervalNotifier, NotifierOps, NotifierRange, Subscription};
use uhmm::mm::range::{HmmPfn, HmmRange, RangeFaultError};
use uhmm::mm::{Mm, Owner};
use uhmm::sys::mem::{Backing, read_process};
use uhmm::{DevicePfn, PAGE_SIZE, PageRange, VirtAddr};

/// The device's copy engine: one thread, one `copy_from_slice` per job.
#[derive(Debug)]
struct Memcpy;

impl CopyEngine for Memcpy {
    fn copy(&self, jobs: &mut [CopyJob<'_>]) -> Result<(), CopyError> {
        for (index, j) in jobs.iter_mut().enumerate() {
            if j.src.len() != j.dst.len() {
                let (src, dst) = (j.src.len(), j.dst.len());
                return Err(CopyError::LengthMismatch { index, src, dst });
            }
            j.dst.copy_from_slice(j.src);
        }
        Ok(())
    }
}

/// A translation: where the device finds the page.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    System { write: bool },
    Device(DevicePfn),
}

/// What the notifier and the fault service reach: the page table and the
/// device memory, each under its lock.
#[derive(Debug)]
struct Inner {
    table: Mutex<BTreeMap<VirtAddr, Entry>>,
    memory: Mutex<Vec<Vec<u8>>>,
}

impl NotifierOps for Inner {
    fn invalidate(&self, sub: &Subscription, r: &NotifierRange, cur_seq: u64) -> bool {
        let Ok(mut table) = (if r.blockable {
            Ok(self.table.lock().unwrap_or_else(|e| e.into_inner()))
        } else {
            self.table.try_lock()
        }) else {
            return false; // the fault service will ask again
        };
        sub.set_seq(cur_seq);
        // Device pages stay where they are; system translations go.
        table.retain(|a, e| !r.range.contains(*a) || matches!(e, Entry::Device(_)));
        true
    }
}

impl DevicePagemapOps for Inner {
    fn page_free(&self, _pfn: DevicePfn) {}

    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), FaultError> {
        // (setup's invalidation takes the table lock itself, so it is taken
        // after; on the fault service, never wait for a lock a faulting
        // thread may hold: ask to be called again instead).
        let mut m = fault.migrate()?;
        let mut table = if fault.blockable() {
            self.table.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            self.table.try_lock().map_err(|_| FaultError::Retry)?
        };
        let srcs: Vec<(VirtAddr, DevicePfn)> = m
            .selected()
            .filter_map(|(_, a, s)| match s {
                MigrateSrc::Device(p) => Some((a, p)),
                _ => None,
            })
            .collect();
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let dsts = m.system_dsts()?;
        let mut jobs: Vec<CopyJob<'_>> = srcs
            .iter()
            .zip(dsts)
            .map(|(&(_, pfn), (_, dst))| CopyJob {
                src: &memory[pfn.0 as usize],
                dst,
            })
            .collect();
        Memcpy
            .copy(&mut jobs)
            .map_err(|e| FaultError::Device(e.to_string()))?;
        drop(jobs);
        drop(memory);
        m.pages();
        for (a, _) in srcs {
            table.remove(&a);
        }
        drop(table);
        m.finalize();
        Ok(())
    }

    fn add_chunk(&self, first: DevicePfn, npages: usize) -> Result<(), DevmemError> {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(memory.len() as u64, first.0);
        memory.extend((0..npages).map(|_| vec![0u8; PAGE_SIZE]));
        Ok(())
    }
}

struct MiniDevice {
    owner: Owner,
    inner: Arc<Inner>,
    notifier: IntervalNotifier,
    pagemap: DevicePagemap,
    mm: Mm,
}

impl MiniDevice {
    fn new(mm: &Mm, range: PageRange) -> Result<MiniDevice, Box<dyn std::error::Error>> {
        let owner = Owner::unique();
        let inner = Arc::new(Inner {
            table: Mutex::new(BTreeMap::new()),
            memory: Mutex::new(Vec::new()),
        });
        let config = PagemapConfig {
            chunk_pages: 256,
            max_chunks: 4,
        };
        Ok(MiniDevice {
            owner,
            notifier: mm.insert_notifier(range, inner.clone())?,
            pagemap: DevicePagemap::new(mm, owner, inner.clone(), config)?,
            inner,
            mm: mm.clone(),
        })
    }

    /// The mirror protocol: read_begin, range_fault, lock, read_retry.
    fn mirror(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error>> {
        loop {
            let seq = self.notifier.read_begin();
            let mut r = HmmRange::new(&self.notifier, seq, range);
            r.default_flags = HmmPfn::REQ_FAULT;
            r.dev_private_owner = Some(self.owner);
            match self.mm.range_fault(&mut r) {
                Ok(()) => {}
                // An invalidation raced with the walk: an ordinary event
                // under load (a device sees many), not a failure. Begin
                // again, as a kernel driver loops on -EBUSY.
                Err(RangeFaultError::Busy { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
            let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
            if self.notifier.read_retry(seq) {
                continue;
            }
            for (a, p) in range.pages().zip(&r.pfns) {
                let e = match p.device_pfn() {
                    Some(pfn) => Entry::Device(pfn),
                    None => Entry::System {
                        write: p.contains(HmmPfn::WRITE),
                    },
                };
                table.insert(a, e);
            }
            return Ok(());
        }
    }

    /// The device reads one page through its translation.
    fn read_page(&self, addr: VirtAddr) -> Option<Vec<u8>> {
        let table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![0u8; PAGE_SIZE];
        match table.get(&addr)? {
            Entry::System { .. } => read_process(addr, &mut buf).ok()?,
            Entry::Device(pfn) => {
                let memory = self.inner.memory.lock().unwrap_or_else(|e| e.into_inner());
                buf.copy_from_slice(&memory[pfn.0 as usize]);
            }
        }
        Some(buf)
    }

    /// Moves `range` into device memory with its own engine.
    fn migrate_to_device(&self, range: PageRange) -> Result<usize, Box<dyn std::error::Error>> {
        let mut m = MigrateVma::setup(&self.mm, range, Select::SYSTEM, self.owner)?;
        let picked: Vec<(usize, VirtAddr, MigrateSrc)> = m.selected().collect();
        let pfns = self.pagemap.alloc(picked.len())?;
        {
            let mut memory = self.inner.memory.lock().unwrap_or_else(|e| e.into_inner());
            for (&(i, _, src), pfn) in picked.iter().zip(&pfns) {
                let page = &mut memory[pfn.0 as usize];
                match (src, m.src_bytes(i)) {
                    (MigrateSrc::System, Some(bytes)) => Memcpy.copy(&mut [CopyJob {
                        src: bytes,
                        dst: page,
                    }])?,
                    _ => page.fill(0), // a hole: allocate and clear
                }
            }
        }
        for (&(i, _, _), &pfn) in picked.iter().zip(&pfns) {
            m.set_device_dst(i, pfn)?;
        }
        m.pages();
        let mut table = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        for &(i, a, _) in &picked {
            if m.migrated(i)
                && let Some(pfn) = self.mm.device_page(a, self.owner)
            {
                table.insert(a, Entry::Device(pfn));
            }
        }
        drop(table);
        let n = m.migrated_count();
        m.finalize();
        Ok(n)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mm = Mm::new()?;
    let region = mm.alloc(16 * PAGE_SIZE, Backing::AnonPrivate)?;
    let range = region.range();
    region.write_at(0, b"written by the CPU")?;
    let dev = MiniDevice::new(&mm, range)?;

    dev.mirror(range)?;
    let seen = dev.read_page(range.start()).ok_or("no translation")?;
    assert_eq!(&seen[..18], b"written by the CPU");
    println!(
        "mirrored {} pages; the device reads what the CPU wrote",
        range.npages()
    );

    let moved = dev.migrate_to_device(range)?;
    println!(
        "migrated {moved} pages to device memory; page 0 is {:?}",
        mm.page_state(range.start())?
    );
    let seen = dev.read_page(range.start()).ok_or("no translation")?;
    assert_eq!(&seen[..18], b"written by the CPU");

    // The CPU reads it back (here through the kernel: a system call on the
    // program's behalf faults the page home just like a load would).
    let mut back = [0u8; 18];
    region.read_at(0, &mut back)?;
    assert_eq!(&back, b"written by the CPU");
    println!(
        "the CPU read it back; page 0 is {:?}; {} device pages left",
        mm.page_state(range.start())?,
        dev.pagemap.stats().in_use
    );
    Ok(())
}
