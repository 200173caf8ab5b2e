//! Address newtypes: [`VirtAddr`] and [`PageRange`].
//!
//! Every address uhmm handles is a `VirtAddr`, and every range of pages is a
//! `PageRange`: a non-empty, page-aligned, half-open interval `[start, end)`.
//! Arithmetic goes through `checked_*` methods, so an overflow is an error
//! value, never a wrap-around. A `PageRange` that exists is valid: functions
//! that take one do not need to check alignment or emptiness again.

use std::fmt;

/// The base page size uhmm works in (4 KiB on x86_64 and on the 4K-page
/// configurations of other architectures).
///
/// Huge pages (THP, hugetlb) are multiples of it; their size is reported
/// per mapping, never assumed.
pub const PAGE_SIZE: usize = 4096;

/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// A virtual address in the calling process.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(usize);

impl VirtAddr {
    /// The address `addr`.
    pub const fn new(addr: usize) -> Self {
        Self(addr)
    }

    /// The address a pointer points to.
    pub fn from_ptr<T>(ptr: *const T) -> Self {
        Self(ptr as usize)
    }

    /// The address as an integer.
    pub const fn get(self) -> usize {
        self.0
    }

    /// The address as a raw pointer. Creating the pointer is safe; using it
    /// is the caller's business.
    pub const fn as_ptr<T>(self) -> *const T {
        self.0 as *const T
    }

    /// The address as a raw mutable pointer.
    pub const fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as *mut T
    }

    /// `self + off`, or `None` on overflow.
    pub const fn checked_add(self, off: usize) -> Option<Self> {
        match self.0.checked_add(off) {
            Some(a) => Some(Self(a)),
            None => None,
        }
    }

    /// `self - off`, or `None` on underflow.
    pub const fn checked_sub(self, off: usize) -> Option<Self> {
        match self.0.checked_sub(off) {
            Some(a) => Some(Self(a)),
            None => None,
        }
    }

    /// The distance from `base` up to `self`, or `None` if `self < base`.
    pub const fn offset_from(self, base: VirtAddr) -> Option<usize> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: usize) -> bool {
        self.0 & (align - 1) == 0
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.is_aligned(PAGE_SIZE)
    }

    /// The address rounded down to a multiple of `align` (a power of two).
    pub const fn align_down(self, align: usize) -> Self {
        Self(self.0 & !(align - 1))
    }

    /// The address rounded up to a multiple of `align` (a power of two), or
    /// `None` on overflow.
    pub const fn checked_align_up(self, align: usize) -> Option<Self> {
        match self.0.checked_add(align - 1) {
            Some(a) => Some(Self(a & !(align - 1))),
            None => None,
        }
    }

    /// The page that contains this address.
    pub const fn page_down(self) -> Self {
        self.align_down(PAGE_SIZE)
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A page of device memory, numbered within its device's memory (the
/// kernel's device-private PFN). Meaningful only together with the
/// [`Owner`](crate::mm::Owner) whose memory it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePfn(pub u64);

impl fmt::Display for DevicePfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dpfn {:#x}", self.0)
    }
}

/// Why a [`PageRange`] could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range would hold no page.
    #[error("empty range at {start}: a page range holds at least one page")]
    Empty {
        /// Where the range would have started.
        start: VirtAddr,
    },
    /// The start is not a multiple of the page size.
    #[error("range start {start} is not aligned to the {align}-byte page size")]
    UnalignedStart {
        /// The offending start.
        start: VirtAddr,
        /// The alignment that was required.
        align: usize,
    },
    /// The length (or the end) is not a multiple of the page size.
    #[error("range length {len:#x} at {start} is not a multiple of the {align}-byte page size")]
    UnalignedLen {
        /// The start of the range.
        start: VirtAddr,
        /// The offending length.
        len: usize,
        /// The alignment that was required.
        align: usize,
    },
    /// `start + len` does not fit in an address.
    #[error("range at {start} with length {len:#x} overflows the address space")]
    Overflow {
        /// The start of the range.
        start: VirtAddr,
        /// The length that overflowed.
        len: usize,
    },
    /// `end` lies before `start`.
    #[error("range end {end} lies before its start {start}")]
    Inverted {
        /// The start of the range.
        start: VirtAddr,
        /// The end that came first.
        end: VirtAddr,
    },
}

/// A non-empty, page-aligned, half-open range of virtual pages `[start, end)`.
///
/// ```
/// use uhmm::{PageRange, VirtAddr, PAGE_SIZE};
///
/// let r = PageRange::new(VirtAddr::new(0x10000), 4 * PAGE_SIZE)?;
/// assert_eq!(r.npages(), 4);
/// assert_eq!(r.end(), VirtAddr::new(0x14000));
/// assert!(PageRange::new(VirtAddr::new(0x10001), PAGE_SIZE).is_err());
/// # Ok::<(), uhmm::RangeError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    start: VirtAddr,
    end: VirtAddr,
}

impl PageRange {
    /// The range of `len` bytes starting at `start`. Both must be multiples of
    /// [`PAGE_SIZE`] and `len` must not be zero.
    pub fn new(start: VirtAddr, len: usize) -> Result<Self, RangeError> {
        Self::with_align(start, len, PAGE_SIZE)
    }

    /// Like [`PageRange::new`], with a larger alignment (a power of two, for
    /// example a huge page size).
    pub fn with_align(start: VirtAddr, len: usize, align: usize) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if !start.is_aligned(align) {
            return Err(RangeError::UnalignedStart { start, align });
        }
        if len & (align - 1) != 0 {
            return Err(RangeError::UnalignedLen { start, len, align });
        }
        let end = start
            .checked_add(len)
            .ok_or(RangeError::Overflow { start, len })?;
        Ok(Self { start, end })
    }

    /// The range `[start, end)`.
    pub fn from_bounds(start: VirtAddr, end: VirtAddr) -> Result<Self, RangeError> {
        let len = end
            .offset_from(start)
            .ok_or(RangeError::Inverted { start, end })?;
        Self::new(start, len)
    }

    /// The smallest page range covering `len` bytes at `addr` (which need not
    /// be aligned).
    pub fn covering(addr: VirtAddr, len: usize) -> Result<Self, RangeError> {
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_align_up(PAGE_SIZE))
            .ok_or(RangeError::Overflow { start: addr, len })?;
        Self::from_bounds(addr.page_down(), end)
    }

    /// The first address in the range.
    pub const fn start(self) -> VirtAddr {
        self.start
    }

    /// The first address past the range (exclusive end).
    pub const fn end(self) -> VirtAddr {
        self.end
    }

    /// The length in bytes (never zero).
    pub const fn len(self) -> usize {
        self.end.0 - self.start.0
    }

    /// Always `false`: a `PageRange` holds at least one page. Present for
    /// API symmetry with collections.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// The number of base pages.
    pub const fn npages(self) -> usize {
        self.len() >> PAGE_SHIFT
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(self, addr: VirtAddr) -> bool {
        self.start.0 <= addr.0 && addr.0 < self.end.0
    }

    /// Whether `other` lies entirely inside the range.
    pub const fn contains_range(self, other: PageRange) -> bool {
        self.start.0 <= other.start.0 && other.end.0 <= self.end.0
    }

    /// Whether the two ranges share at least one page.
    pub const fn overlaps(self, other: PageRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// The pages the two ranges share, if any.
    pub fn intersection(self, other: PageRange) -> Option<PageRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(PageRange { start, end })
    }

    /// The parts of `self` outside `covered` (ranges in address order),
    /// in address order.
    pub(crate) fn outside(self, covered: impl IntoIterator<Item = PageRange>) -> Vec<PageRange> {
        let mut gaps = Vec::new();
        let mut cursor = self.start;
        for r in covered {
            gaps.extend(PageRange::from_bounds(cursor, r.start.min(self.end)).ok());
            cursor = cursor.max(r.end);
        }
        gaps.extend(PageRange::from_bounds(cursor, self.end).ok());
        gaps
    }

    /// The sub-range that starts `offset` bytes in and is `len` bytes long,
    /// or `None` if it is not a valid page range inside `self`.
    pub fn subrange(self, offset: usize, len: usize) -> Option<PageRange> {
        let start = self.start.checked_add(offset)?;
        let sub = PageRange::new(start, len).ok()?;
        self.contains_range(sub).then_some(sub)
    }

    /// The `index`-th page of the range as a one-page range.
    pub fn page(self, index: usize) -> Option<PageRange> {
        self.subrange(index.checked_mul(PAGE_SIZE)?, PAGE_SIZE)
    }

    /// The part of the range from `addr` on, or `None` if `addr` is at or
    /// past the end (or not page-aligned).
    pub fn tail_from(self, addr: VirtAddr) -> Option<PageRange> {
        if addr < self.start {
            return Some(self);
        }
        PageRange::from_bounds(addr, self.end).ok()
    }

    /// The start addresses of every page in the range.
    pub fn pages(self) -> impl DoubleEndedIterator<Item = VirtAddr> + ExactSizeIterator {
        (self.start.0..self.end.0).step_by(PAGE_SIZE).map(VirtAddr)
    }
}

impl fmt::Debug for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) ({} page{})",
            self.start.0,
            self.end.0,
            self.npages(),
            if self.npages() == 1 { "" } else { "s" }
        )
    }
}

/// A hasher for keys that are distinct small integers (device page numbers,
/// owners): one multiplication per word. No untrusted input reaches the
/// tables it serves, and SipHash cost a fifth of a small migration's time.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

/// Builds [`IdHasher`]s.
pub(crate) type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: VirtAddr = VirtAddr::new(0x7f00_0000_0000);

    #[test]
    fn the_parts_outside_covered_ranges() {
        let pages = |i: usize, n: usize| {
            PageRange::new(A.checked_add(i * PAGE_SIZE).unwrap(), n * PAGE_SIZE).unwrap()
        };
        let r = pages(0, 10);
        assert_eq!(r.outside([]), vec![r]);
        assert_eq!(r.outside([r]), vec![]);
        // Overlapping and touching covers, one at each end.
        assert_eq!(
            r.outside([pages(0, 2), pages(3, 2), pages(4, 2), pages(9, 1)]),
            vec![pages(2, 1), pages(6, 3)]
        );
    }

    #[test]
    fn page_range_validates() {
        assert_eq!(PageRange::new(A, 0), Err(RangeError::Empty { start: A }));
        assert!(matches!(
            PageRange::new(VirtAddr::new(A.get() + 1), PAGE_SIZE),
            Err(RangeError::UnalignedStart { .. })
        ));
        assert!(matches!(
            PageRange::new(A, PAGE_SIZE + 1),
            Err(RangeError::UnalignedLen { .. })
        ));
        assert!(matches!(
            PageRange::new(VirtAddr::new(usize::MAX & !(PAGE_SIZE - 1)), 2 * PAGE_SIZE),
            Err(RangeError::Overflow { .. })
        ));
        assert!(matches!(
            PageRange::from_bounds(A, VirtAddr::new(A.get() - PAGE_SIZE)),
            Err(RangeError::Inverted { .. })
        ));
        let r = PageRange::new(A, 3 * PAGE_SIZE).unwrap();
        assert_eq!(r.npages(), 3);
        assert_eq!(r.pages().count(), 3);
        assert_eq!(
            r.pages().last(),
            Some(VirtAddr::new(A.get() + 2 * PAGE_SIZE))
        );
    }

    #[test]
    fn errors_name_the_range() {
        let e = PageRange::new(VirtAddr::new(0x1234), PAGE_SIZE).unwrap_err();
        assert!(e.to_string().contains("0x1234"), "{e}");
    }

    #[test]
    fn set_operations() {
        let r = PageRange::new(A, 4 * PAGE_SIZE).unwrap();
        let s = PageRange::new(VirtAddr::new(A.get() + 2 * PAGE_SIZE), 4 * PAGE_SIZE).unwrap();
        assert!(r.overlaps(s) && s.overlaps(r));
        assert_eq!(r.intersection(s).unwrap().npages(), 2);
        assert!(!r.contains_range(s));
        assert!(r.contains(A) && !r.contains(r.end()));
        assert_eq!(r.subrange(PAGE_SIZE, PAGE_SIZE), r.page(1));
        assert_eq!(r.subrange(3 * PAGE_SIZE, 2 * PAGE_SIZE), None);
        assert_eq!(r.tail_from(r.end()), None);
        assert_eq!(r.tail_from(s.start()).unwrap().npages(), 2);
        let c = PageRange::covering(VirtAddr::new(A.get() + 10), PAGE_SIZE).unwrap();
        assert_eq!((c.start(), c.npages()), (A, 2));
        let t = PageRange::new(VirtAddr::new(A.get() + 4 * PAGE_SIZE), PAGE_SIZE).unwrap();
        assert!(!r.overlaps(t) && r.intersection(t).is_none());
    }
}
