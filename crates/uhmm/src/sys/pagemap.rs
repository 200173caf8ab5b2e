//! Page-table snapshots of the own process: the `PAGEMAP_SCAN` ioctl (6.7+)
//! on `/proc/self/pagemap`, with plain 64-bit pagemap entries as fallback.
//!
//! A scan walks `[start, end)` and returns the pages that match a
//! [`ScanQuery`] as [`PageRegion`]s: runs of adjacent pages whose reported
//! categories are equal. Gaps between mappings are skipped.
//!
//! ```no_run
//! use uhmm::sys::mem::Mapping;
//! use uhmm::sys::pagemap::{Categories, Pagemap, ScanQuery};
//! use uhmm::PAGE_SIZE;
//!
//! let map = Mapping::anon(8 * PAGE_SIZE)?;
//! map.write_at(0, &[1u8; PAGE_SIZE])?; // populate the first page
//! let pm = Pagemap::open()?;
//! let mut present = Vec::new();
//! pm.scan(map.range(), &ScanQuery::new().require(Categories::PRESENT), &mut present)?;
//! assert_eq!(present.len(), 1);
//! assert_eq!(present[0].range.npages(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The `walk_end` quirk (seen on 6.18): after a complete scan that did not
//! fill the output buffer, the kernel may report a `walk_end` short of `end`
//! by one internal batch. So a scan is complete when the buffer was not
//! filled (and `max_pages` not reached), whatever `walk_end` says; when the
//! buffer was filled, the next call resumes from the later of `walk_end` and
//! the end of the last region returned, so no page is reported twice.

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PageRange, VirtAddr};
use crate::sys::procmap::{Procmap, ProcmapError};
use bitflags::bitflags;
use linux_raw_sys::general as uapi;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, opcode};
use std::os::fd::{AsFd, OwnedFd};

/// `_IOWR('f', 16, struct pm_scan_arg)`
pub(crate) const PAGEMAP_SCAN: Opcode = opcode::read_write::<uapi::pm_scan_arg>(b'f', 16);

/// Regions fetched per ioctl.
const CHUNK: usize = 256;

bitflags! {
    /// `PAGE_IS_*`: what a page is.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Categories: u64 {
        /// Its mapping has async write-protect enabled.
        const WPALLOWED = uapi::PAGE_IS_WPALLOWED as u64;
        /// Present or swapped, and not write-protected by userfaultfd.
        const WRITTEN = uapi::PAGE_IS_WRITTEN as u64;
        /// Backed by a file or shmem (not anonymous).
        const FILE = uapi::PAGE_IS_FILE as u64;
        /// Present in memory.
        const PRESENT = uapi::PAGE_IS_PRESENT as u64;
        /// Swapped out.
        const SWAPPED = uapi::PAGE_IS_SWAPPED as u64;
        /// Maps the shared zero page.
        const PFNZERO = uapi::PAGE_IS_PFNZERO as u64;
        /// Mapped by a huge page (THP PMD or hugetlb).
        const HUGE = uapi::PAGE_IS_HUGE as u64;
        /// Soft-dirty.
        const SOFT_DIRTY = uapi::PAGE_IS_SOFT_DIRTY as u64;
        /// A guard region (`MADV_GUARD_INSTALL`).
        const GUARD = uapi::PAGE_IS_GUARD as u64;
    }
}

bitflags! {
    /// `PM_SCAN_*`: what a scan does besides reporting.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// Write-protect the matching pages (async-WP dirty tracking).
        const WP_MATCHING = uapi::PM_SCAN_WP_MATCHING as u64;
        /// Abort at the first page without async write-protect.
        const CHECK_WPASYNC = uapi::PM_SCAN_CHECK_WPASYNC as u64;
    }
}

/// Which pages a scan reports and with which categories, with the kernel's
/// matching rule: a page matches when every `require`d category is set,
/// every `exclude`d one is clear, and (if `any_of` is not empty) at least one
/// of `any_of` holds after the excluded bits are inverted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanQuery {
    inverted: Categories,
    mask: Categories,
    any_of: Categories,
    report: Categories,
    max_pages: usize,
    flags: ScanFlags,
}

impl Default for ScanQuery {
    fn default() -> Self {
        Self::new()
    }
}

impl ScanQuery {
    /// Every page, reporting the categories both backends can tell
    /// (PRESENT, SWAPPED, FILE, WRITTEN, PFNZERO). Ask for HUGE with
    /// [`report`](Self::report); only `PAGEMAP_SCAN` tells it.
    pub fn new() -> Self {
        Self {
            inverted: Categories::empty(),
            mask: Categories::empty(),
            any_of: Categories::empty(),
            report: Categories::PRESENT
                | Categories::SWAPPED
                | Categories::FILE
                | Categories::WRITTEN
                | Categories::PFNZERO,
            max_pages: 0,
            flags: ScanFlags::empty(),
        }
    }

    /// Only pages with all of `c`.
    pub fn require(mut self, c: Categories) -> Self {
        self.mask |= c;
        self.inverted -= c;
        self
    }

    /// Only pages with none of `c`.
    pub fn exclude(mut self, c: Categories) -> Self {
        self.mask |= c;
        self.inverted |= c;
        self
    }

    /// Only pages with at least one of `c`.
    pub fn any_of(mut self, c: Categories) -> Self {
        self.any_of = c;
        self
    }

    /// Report these categories in the regions (adjacent pages merge when
    /// these are equal). Must not be empty.
    pub fn report(mut self, c: Categories) -> Self {
        self.report = c;
        self
    }

    /// Stop after this many matching pages (0: no limit).
    pub fn max_pages(mut self, n: usize) -> Self {
        self.max_pages = n;
        self
    }

    /// Extra actions ([`ScanFlags`]); only the `PAGEMAP_SCAN` backend has them.
    pub fn flags(mut self, f: ScanFlags) -> Self {
        self.flags = f;
        self
    }

    /// Whether a page with categories `c` matches (the kernel's rule).
    pub fn matches(&self, c: Categories) -> bool {
        let c = c ^ self.inverted;
        c.contains(self.mask) && (self.any_of.is_empty() || c.intersects(self.any_of))
    }

    fn interest(&self) -> Categories {
        self.mask | self.any_of | self.report
    }
}

/// A run of adjacent matching pages with equal reported categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRegion {
    /// The pages.
    pub range: PageRange,
    /// Their categories, restricted to the query's reported ones.
    pub categories: Categories,
}

/// Notes a scan of `range` and (up to 16 of) the regions it found in the
/// flight recorder (`crate::record`).
fn recorded(range: PageRange, res: &Result<ScanSummary, PagemapError>, found: &[PageRegion]) {
    use crate::record::{What, note};
    let (errno, pages) = match res {
        Ok(s) => (0, s.pages as i64),
        Err(PagemapError::Scan { errno, .. }) => (errno.raw_os_error() as u16, 0),
        Err(_) => (u16::MAX, 0),
    };
    note(
        What::Scan,
        range.start().get(),
        0,
        range.len(),
        errno,
        pages,
    );
    for r in found.iter().take(16) {
        note(
            What::Found,
            r.range.start().get(),
            r.categories.bits() as usize,
            r.range.len(),
            0,
            0,
        );
    }
}

/// Where a scan stopped and how much it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanSummary {
    /// The address up to which the range was walked: its end, unless
    /// `max_pages` stopped the scan early.
    pub walk_end: VirtAddr,
    /// Matching pages found.
    pub pages: usize,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// A proc file could not be opened or read.
    #[error("cannot read {path}: {errno}")]
    Open {
        /// The file.
        path: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The `PAGEMAP_SCAN` ioctl failed.
    #[error("PAGEMAP_SCAN over {range} failed: {errno}")]
    Scan {
        /// The range scanned.
        range: PageRange,
        /// The error.
        errno: Errno,
    },
    /// The query asks for something the `/proc/self/pagemap` fallback cannot
    /// tell.
    #[error(
        "the /proc/self/pagemap fallback cannot tell {categories:?} (or do {flags:?}); this needs PAGEMAP_SCAN (Linux 6.7+)"
    )]
    Unsupported {
        /// Categories it cannot tell.
        categories: Categories,
        /// Flags it cannot honour.
        flags: ScanFlags,
    },
    /// The fallback needs page frame numbers, which only `CAP_SYS_ADMIN` sees.
    #[error(
        "telling {categories:?} without PAGEMAP_SCAN needs page frame numbers, which only CAP_SYS_ADMIN can read"
    )]
    NeedsPrivilege {
        /// The categories that need it.
        categories: Categories,
    },
    /// The query reports no category.
    #[error("a scan query must report at least one category")]
    EmptyReport,
    /// Listing the mappings failed (fallback only).
    #[error(transparent)]
    Procmap(#[from] ProcmapError),
}

/// How [`Pagemap`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagemapBackend {
    /// The `PAGEMAP_SCAN` ioctl.
    Scan,
    /// 64-bit entries read from `/proc/self/pagemap` (and, for PFNZERO,
    /// `/proc/kpageflags`). It cannot tell WPALLOWED, SOFT_DIRTY or HUGE.
    ProcPagemap,
}

/// A handle on the own process's page tables.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
    backend: PagemapBackend,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`, using `PAGEMAP_SCAN` if the kernel has it.
    pub fn open() -> Result<Self, PagemapError> {
        let mut pm = Self::with_backend(PagemapBackend::Scan)?;
        let mut arg = scan_arg(
            VirtAddr::new(0),
            VirtAddr::new(0),
            &ScanQuery::new(),
            std::ptr::null_mut(),
            0,
        );
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg`; with a null
        // vector of length 0 the kernel writes nothing but `walk_end`.
        let probe = unsafe { super::ioctl_ret::<PAGEMAP_SCAN, _>(pm.fd.as_fd(), &mut arg) };
        if probe == Err(Errno::NOTTY) {
            pm.backend = PagemapBackend::ProcPagemap;
        }
        Ok(pm)
    }

    /// Opens with the given backend, whether or not the kernel has it.
    pub fn with_backend(backend: PagemapBackend) -> Result<Self, PagemapError> {
        let path = "/proc/self/pagemap";
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|errno| PagemapError::Open { path, errno })?;
        Ok(Self { fd, backend })
    }

    /// The backend in use.
    pub fn backend(&self) -> PagemapBackend {
        self.backend
    }

    /// Scans `range` and appends the matching regions to `out` (merged with
    /// the last region already in `out` if they touch and agree).
    ///
    /// A `WP_MATCHING` scan write-protects the pages it reports and skips
    /// memory without async write-protect; with `CHECK_WPASYNC` it fails at
    /// the first such page instead.
    ///
    /// # Errors
    ///
    /// [`PagemapError::Scan`] if the kernel refuses (for example
    /// `CHECK_WPASYNC` meeting memory without async write-protect). The
    /// regions the kernel reported before it failed are still appended to
    /// `out`: a `WP_MATCHING` scan has already write-protected them, so
    /// dropping them would lose their dirty state;
    /// [`PagemapError::Unsupported`] / [`PagemapError::NeedsPrivilege`] when
    /// the fallback cannot answer the query.
    pub fn scan(
        &self,
        range: PageRange,
        query: &ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<ScanSummary, PagemapError> {
        if query.report.is_empty() {
            return Err(PagemapError::EmptyReport);
        }
        let first = out.len();
        let res = match self.backend {
            PagemapBackend::Scan => self.scan_ioctl(range, query, out),
            PagemapBackend::ProcPagemap => self.scan_entries(range, query, out),
        };
        if crate::record::recording() {
            recorded(range, &res, out.get(first..).unwrap_or_default());
        }
        res
    }

    /// Appends the raw 64-bit `/proc/self/pagemap` entry of every page of
    /// `range` to `out` (bit 63 present, 62 swapped, 61 file or shared, 57
    /// uffd write-protected, 56 exclusively mapped, 55 soft-dirty; the page
    /// frame number in bits 0-54, zero without `CAP_SYS_ADMIN`).
    pub fn entries(&self, range: PageRange, out: &mut Vec<u64>) -> Result<(), PagemapError> {
        let mut chunk = [0u64; 512];
        let mut page = range.start();
        while page < range.end() {
            let n = ((range.end().get() - page.get()) >> PAGE_SHIFT).min(chunk.len());
            let got = read_entries(self.fd.as_fd(), page, &mut chunk[..n])?;
            if got == 0 {
                return Err(PagemapError::Open {
                    path: "/proc/self/pagemap",
                    errno: Errno::IO,
                });
            }
            out.extend_from_slice(&chunk[..got]);
            page = VirtAddr::new(page.get() + (got << PAGE_SHIFT));
        }
        Ok(())
    }

    fn scan_ioctl(
        &self,
        range: PageRange,
        query: &ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<ScanSummary, PagemapError> {
        let mut buf = [uapi::page_region {
            start: 0,
            end: 0,
            categories: 0,
        }; CHUNK];
        let mut cursor = range.start();
        let mut pages = 0usize;
        loop {
            let left = if query.max_pages == 0 {
                0
            } else {
                query.max_pages.saturating_sub(pages).max(1)
            };
            let mut arg = scan_arg(cursor, range.end(), query, buf.as_mut_ptr(), left);
            // Zeroed so that, if the call fails, the regions it did write can
            // still be told from the rest (a written region has start < end).
            buf.fill(uapi::page_region {
                start: 0,
                end: 0,
                categories: 0,
            });
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg`; `vec` points
            // to `buf`, which is live and holds `vec_len` regions.
            let res = unsafe { super::ioctl_ret::<PAGEMAP_SCAN, _>(self.fd.as_fd(), &mut arg) };
            let n = match res {
                Ok(n) => (n as usize).min(CHUNK),
                Err(errno) => {
                    for r in buf.iter().take_while(|r| r.start < r.end) {
                        if let Some(region) = to_range(r) {
                            push_merged(out, region, Categories::from_bits_retain(r.categories));
                        }
                    }
                    return Err(PagemapError::Scan { range, errno });
                }
            };
            let mut last_end = cursor;
            for r in &buf[..n] {
                let Some(region) = to_range(r) else {
                    continue;
                };
                pages += region.npages();
                last_end = region.end();
                push_merged(out, region, Categories::from_bits_retain(r.categories));
            }
            let limited = query.max_pages != 0 && pages >= query.max_pages;
            if limited {
                return Ok(ScanSummary {
                    walk_end: VirtAddr::new(arg.walk_end as usize).max(last_end),
                    pages,
                });
            }
            if n < CHUNK {
                // Complete, whatever `walk_end` says (see the module docs).
                return Ok(ScanSummary {
                    walk_end: range.end(),
                    pages,
                });
            }
            cursor = VirtAddr::new(arg.walk_end as usize).max(last_end);
            if cursor >= range.end() {
                return Ok(ScanSummary {
                    walk_end: range.end(),
                    pages,
                });
            }
        }
    }

    fn scan_entries(
        &self,
        range: PageRange,
        query: &ScanQuery,
        out: &mut Vec<PageRegion>,
    ) -> Result<ScanSummary, PagemapError> {
        // HUGE is left out: the page flag behind it marks every page of a
        // large folio, also after its huge mapping was split, and says
        // nothing of hugetlb pages not yet faulted, so it would disagree
        // with PAGEMAP_SCAN.
        let unsupported =
            query.interest() & (Categories::WPALLOWED | Categories::SOFT_DIRTY | Categories::HUGE);
        if !unsupported.is_empty() || !query.flags.is_empty() {
            return Err(PagemapError::Unsupported {
                categories: unsupported,
                flags: query.flags,
            });
        }
        let pfn_cats = query.interest() & Categories::PFNZERO;
        let kpageflags = if pfn_cats.is_empty() {
            None
        } else {
            Some(KpageFlags::open(pfn_cats)?)
        };
        let maps = Procmap::open()?;
        let mut pages = 0usize;
        let mut entries = Vec::new();
        for vma in maps.covering(range)? {
            let Some(part) = vma.range.intersection(range) else {
                continue;
            };
            entries.clear();
            self.entries(part, &mut entries)?;
            for (&e, one) in entries.iter().zip(part.pages()) {
                let cats = entry_categories(e, kpageflags.as_ref(), pfn_cats)?;
                if !query.matches(cats) {
                    continue;
                }
                let Ok(one) = PageRange::new(one, PAGE_SIZE) else {
                    continue;
                };
                push_merged(out, one, cats & query.report);
                pages += 1;
                if query.max_pages != 0 && pages >= query.max_pages {
                    return Ok(ScanSummary {
                        walk_end: one.end(),
                        pages,
                    });
                }
            }
        }
        Ok(ScanSummary {
            walk_end: range.end(),
            pages,
        })
    }
}

fn to_range(r: &uapi::page_region) -> Option<PageRange> {
    let (start, end) = (usize::try_from(r.start).ok()?, usize::try_from(r.end).ok()?);
    PageRange::from_bounds(VirtAddr::new(start), VirtAddr::new(end)).ok()
}

fn push_merged(out: &mut Vec<PageRegion>, range: PageRange, categories: Categories) {
    if let Some(last) = out.last_mut()
        && last.range.end() == range.start()
        && last.categories == categories
        && let Ok(merged) = PageRange::from_bounds(last.range.start(), range.end())
    {
        last.range = merged;
        return;
    }
    out.push(PageRegion { range, categories });
}

fn scan_arg(
    start: VirtAddr,
    end: VirtAddr,
    q: &ScanQuery,
    vec: *mut uapi::page_region,
    max_pages: usize,
) -> uapi::pm_scan_arg {
    uapi::pm_scan_arg {
        size: std::mem::size_of::<uapi::pm_scan_arg>() as u64,
        flags: q.flags.bits(),
        start: start.get() as u64,
        end: end.get() as u64,
        walk_end: 0,
        vec: vec as u64,
        vec_len: if vec.is_null() { 0 } else { CHUNK as u64 },
        max_pages: max_pages as u64,
        category_inverted: q.inverted.bits(),
        category_mask: q.mask.bits(),
        category_anyof_mask: q.any_of.bits(),
        return_mask: q.report.bits(),
    }
}

/// Reads the pagemap entries of the pages from `page` on into `entries`;
/// returns how many were read.
fn read_entries(
    fd: std::os::fd::BorrowedFd<'_>,
    page: VirtAddr,
    entries: &mut [u64],
) -> Result<usize, PagemapError> {
    let mut bytes = [0u8; 512 * 8];
    let want = entries.len() * 8;
    let off = (page.get() >> PAGE_SHIFT) as u64 * 8;
    let n = crate::sys::retry_eintr(|| rustix::io::pread(fd, &mut bytes[..want], off)).map_err(
        |errno| PagemapError::Open {
            path: "/proc/self/pagemap",
            errno,
        },
    )?;
    for (e, b) in entries.iter_mut().zip(bytes[..n].chunks_exact(8)) {
        *e = u64::from_ne_bytes(b.try_into().unwrap_or_default());
    }
    Ok(n / 8)
}

// The bits of a /proc/self/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
const PM_GUARD: u64 = 1 << 58;
const PM_UFFD_WP: u64 = 1 << 57;
const PM_PFN_MASK: u64 = (1 << 55) - 1;
// The bit of a /proc/kpageflags entry that marks the zero page.
const KPF_ZERO_PAGE: u64 = 1 << 24;

fn entry_categories(
    e: u64,
    kpf: Option<&KpageFlags>,
    pfn_cats: Categories,
) -> Result<Categories, PagemapError> {
    let mut c = Categories::empty();
    let present = e & PM_PRESENT != 0;
    let swapped = e & PM_SWAPPED != 0;
    c.set(Categories::PRESENT, present);
    c.set(Categories::SWAPPED, swapped);
    c.set(Categories::GUARD, e & PM_GUARD != 0);
    if present || swapped {
        c.set(Categories::FILE, e & PM_FILE_OR_SHARED != 0);
        c.set(Categories::WRITTEN, e & PM_UFFD_WP == 0);
    }
    if let (true, Some(kpf)) = (present, kpf) {
        let pfn = e & PM_PFN_MASK;
        if pfn == 0 {
            return Err(PagemapError::NeedsPrivilege {
                categories: pfn_cats,
            });
        }
        let flags = kpf.flags(pfn)?;
        c.set(Categories::PFNZERO, flags & KPF_ZERO_PAGE != 0);
    }
    Ok(c)
}

/// `/proc/kpageflags`, for the fallback's PFNZERO.
struct KpageFlags {
    fd: OwnedFd,
}

impl KpageFlags {
    fn open(cats: Categories) -> Result<Self, PagemapError> {
        let fd = rustix::fs::open(
            "/proc/kpageflags",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::ACCESS | Errno::PERM => PagemapError::NeedsPrivilege { categories: cats },
            errno => PagemapError::Open {
                path: "/proc/kpageflags",
                errno,
            },
        })?;
        Ok(Self { fd })
    }

    fn flags(&self, pfn: u64) -> Result<u64, PagemapError> {
        let mut b = [0u8; 8];
        crate::sys::retry_eintr(|| rustix::io::pread(&self.fd, &mut b, pfn * 8)).map_err(
            |errno| PagemapError::Open {
                path: "/proc/kpageflags",
                errno,
            },
        )?;
        Ok(u64::from_ne_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode() {
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn matching_rule() {
        let q = ScanQuery::new()
            .require(Categories::PRESENT)
            .exclude(Categories::PFNZERO);
        assert!(q.matches(Categories::PRESENT | Categories::WRITTEN));
        assert!(!q.matches(Categories::PRESENT | Categories::PFNZERO));
        assert!(!q.matches(Categories::SWAPPED));
        let a = ScanQuery::new().any_of(Categories::PRESENT | Categories::SWAPPED);
        assert!(a.matches(Categories::SWAPPED) && !a.matches(Categories::FILE));
        assert!(ScanQuery::new().matches(Categories::empty()));
    }

    #[test]
    fn entries_decode() {
        let none = Categories::empty();
        let c = entry_categories(PM_PRESENT | PM_FILE_OR_SHARED, None, none).unwrap();
        assert_eq!(
            c,
            Categories::PRESENT | Categories::FILE | Categories::WRITTEN
        );
        let c = entry_categories(PM_PRESENT | PM_UFFD_WP, None, none).unwrap();
        assert_eq!(c, Categories::PRESENT);
        assert_eq!(entry_categories(0, None, none).unwrap(), none);
    }

    #[test]
    fn merging() {
        let p =
            |i: usize| PageRange::new(VirtAddr::new(0x10000 + i * PAGE_SIZE), PAGE_SIZE).unwrap();
        let mut out = Vec::new();
        push_merged(&mut out, p(0), Categories::PRESENT);
        push_merged(&mut out, p(1), Categories::PRESENT);
        push_merged(&mut out, p(2), Categories::SWAPPED);
        push_merged(&mut out, p(4), Categories::SWAPPED);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].range.npages(), 2);
    }
}
