//! Mappings and the operations on them: mmap (anon private, shared anon,
//! memfd, hugetlb, file), madvise, mprotect, and fault-tolerant access to
//! the own process's memory through `process_vm_readv`/`process_vm_writev`.
//!
//! [`Mapping`] owns a mapping and never hands out a Rust reference into it:
//! its bytes are read and written by copy ([`Mapping::read_at`],
//! [`Mapping::write_at`]). That is what makes its destructive operations
//! (discard, protect) safe methods, and it matches how the memory is used —
//! other threads, the kernel and devices may change it at any time. The free
//! functions that act on arbitrary addresses are `unsafe` when they can
//! change memory under a reference.
//!
//! ```
//! use uhmm::sys::mem::{Advice, Mapping};
//! use uhmm::PAGE_SIZE;
//!
//! let map = Mapping::anon(4 * PAGE_SIZE)?;
//! map.write_at(PAGE_SIZE, b"hello")?;
//! let mut buf = [0u8; 5];
//! map.read_at(PAGE_SIZE, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! map.advise(map.range(), Advice::DontNeed)?; // private anon: back to zeros
//! map.read_at(PAGE_SIZE, &mut buf)?;
//! assert_eq!(buf, [0; 5]);
//! # Ok::<(), uhmm::sys::mem::MemError>(())
//! ```

use crate::addr::{PAGE_SIZE, PageRange, RangeError, VirtAddr};
use bitflags::bitflags;
use rustix::fs::MemfdFlags;
use rustix::io::Errno;
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use std::ffi::c_void;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

bitflags! {
    /// Page protection: what a mapping allows (`PROT_*`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Prot: u32 {
        /// Readable.
        const READ = 1;
        /// Writable.
        const WRITE = 2;
        /// Executable.
        const EXEC = 4;
    }
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);

    fn mmap_flags(self) -> ProtFlags {
        let mut f = ProtFlags::empty();
        f.set(ProtFlags::READ, self.contains(Prot::READ));
        f.set(ProtFlags::WRITE, self.contains(Prot::WRITE));
        f.set(ProtFlags::EXEC, self.contains(Prot::EXEC));
        f
    }

    fn mprotect_flags(self) -> MprotectFlags {
        let mut f = MprotectFlags::empty();
        f.set(MprotectFlags::READ, self.contains(Prot::READ));
        f.set(MprotectFlags::WRITE, self.contains(Prot::WRITE));
        f.set(MprotectFlags::EXEC, self.contains(Prot::EXEC));
        f
    }
}

/// `madvise` advice that uhmm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages; private anonymous memory reads back
    /// as zeros, shared memory re-reads the file. Destructive.
    DontNeed,
    /// `MADV_REMOVE`: free the backing store of shared memory (punch a
    /// hole). Destructive.
    Remove,
    /// `MADV_POPULATE_READ`: fault the pages in for reading.
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: fault the pages in for writing (allocates).
    PopulateWrite,
    /// `MADV_HUGEPAGE`: allow THP.
    HugePage,
    /// `MADV_NOHUGEPAGE`: forbid THP.
    NoHugePage,
    /// `MADV_DONTFORK`: a child does not inherit the range.
    DontFork,
    /// `MADV_DOFORK`: undo `DontFork`.
    DoFork,
}

impl Advice {
    fn raw(self) -> rustix::mm::Advice {
        use rustix::mm::Advice as A;
        match self {
            Advice::DontNeed => A::LinuxDontNeed,
            Advice::Remove => A::LinuxRemove,
            Advice::PopulateRead => A::LinuxPopulateRead,
            Advice::PopulateWrite => A::LinuxPopulateWrite,
            Advice::HugePage => A::LinuxHugepage,
            Advice::NoHugePage => A::LinuxNoHugepage,
            Advice::DontFork => A::LinuxDontFork,
            Advice::DoFork => A::LinuxDoFork,
        }
    }

    /// Whether the advice can change memory contents.
    pub fn is_destructive(self) -> bool {
        matches!(self, Advice::DontNeed | Advice::Remove)
    }
}

/// What memory backs a mapping.
#[derive(Debug)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`).
    AnonPrivate,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, shmem).
    AnonShared,
    /// A new memfd of the mapping's size, mapped shared; the mapping keeps
    /// the fd ([`Mapping::fd`]) so that it can be mapped again.
    Memfd,
    /// hugetlb memory with pages of `page_size` (2 MiB or 1 GiB), from the
    /// pool reserved in `/proc/sys/vm/nr_hugepages`.
    Hugetlb {
        /// The huge page size.
        page_size: usize,
        /// Mapped shared (a hugetlb memfd) rather than private.
        shared: bool,
    },
    /// A file, mapped from `offset` (a multiple of the page size).
    File {
        /// The file; the mapping keeps it.
        fd: OwnedFd,
        /// Offset into the file.
        offset: u64,
        /// `MAP_SHARED` (otherwise private copy-on-write).
        shared: bool,
    },
}

impl Backing {
    fn name(&self) -> &'static str {
        match self {
            Backing::AnonPrivate => "private anonymous",
            Backing::AnonShared => "shared anonymous",
            Backing::Memfd => "memfd",
            Backing::Hugetlb { shared: false, .. } => "private hugetlb",
            Backing::Hugetlb { shared: true, .. } => "shared hugetlb",
            Backing::File { .. } => "file",
        }
    }
}

/// A read or write through the fault-tolerant accessor did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access to {len} bytes at {addr} stopped after {done} bytes: {errno}")]
pub struct AccessError {
    /// Where the access started.
    pub addr: VirtAddr,
    /// How many bytes were asked for.
    pub len: usize,
    /// How many were transferred before the error.
    pub done: usize,
    /// EFAULT for an unmapped or protected address.
    pub errno: Errno,
}

/// Why a mapping operation failed. The memory is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The length is zero or not a multiple of the page size.
    #[error("mapping length {len:#x} must be a non-zero multiple of {align} bytes")]
    BadLength {
        /// The length asked for.
        len: usize,
        /// The required multiple.
        align: usize,
    },
    /// mmap failed.
    #[error("mmap of {len:#x} bytes of {backing} memory failed: {errno}")]
    Map {
        /// The length asked for.
        len: usize,
        /// The kind of memory.
        backing: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The hugetlb pool has too few free pages.
    #[error(
        "no {page_size}-byte huge pages free for {len:#x} bytes; reserve some with `echo N > /proc/sys/vm/nr_hugepages` (root)"
    )]
    NoHugePages {
        /// The length asked for.
        len: usize,
        /// The huge page size.
        page_size: usize,
    },
    /// The huge page size is not one the kernel offers.
    #[error(
        "huge page size {page_size:#x} is not offered by this kernel (see /sys/kernel/mm/hugepages; usually 2 MiB or 1 GiB)"
    )]
    BadHugePageSize {
        /// The size asked for.
        page_size: usize,
    },
    /// memfd_create or ftruncate failed.
    #[error("creating a {len:#x}-byte memfd failed: {errno}")]
    Memfd {
        /// The length asked for.
        len: usize,
        /// The error.
        errno: Errno,
    },
    /// A range or offset lies (partly) outside the mapping.
    #[error("{what} is outside the mapping {mapping}")]
    OutOfBounds {
        /// What was asked for.
        what: String,
        /// The mapping.
        mapping: PageRange,
    },
    /// Managed memory touched from the fault service's own thread (a
    /// device callback): a fault there would wait for the service itself.
    #[error(
        "managed memory cannot be accessed from the fault service's thread (a device callback): the access would wait for itself"
    )]
    OnFaultService,
    /// A value's offset is not a multiple of its alignment.
    #[error("offset {offset:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// The offset.
        offset: usize,
        /// The alignment its type needs.
        align: usize,
    },
    /// madvise failed.
    #[error("madvise({advice:?}) on {range} failed: {errno}")]
    Advise {
        /// The range.
        range: PageRange,
        /// The advice.
        advice: Advice,
        /// The error (ENOMEM: part of the range is not mapped).
        errno: Errno,
    },
    /// mprotect failed.
    #[error("mprotect({prot:?}) on {range} failed: {errno}")]
    Protect {
        /// The range.
        range: PageRange,
        /// The protection.
        prot: Prot,
        /// The error (ENOMEM: part of the range is not mapped).
        errno: Errno,
    },
    /// The mapping has no file descriptor to map again.
    #[error(
        "the mapping {mapping} has no file descriptor to map again; use Backing::Memfd (or a shared hugetlb or file backing) for memory that is mapped twice"
    )]
    NoFile {
        /// The mapping.
        mapping: PageRange,
    },
    /// A fault-tolerant access failed.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// An invalid range.
    #[error(transparent)]
    Range(#[from] RangeError),
}

/// Builds a [`Mapping`].
#[derive(Debug)]
pub struct MappingBuilder {
    len: usize,
    backing: Backing,
    prot: Prot,
    align: usize,
    populate: bool,
    noreserve: bool,
}

impl MappingBuilder {
    /// The memory behind the mapping (default: private anonymous).
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// The protection (default: read-write).
    pub fn prot(mut self, prot: Prot) -> Self {
        self.prot = prot;
        self
    }

    /// Align the start to `align` bytes (a power of two), for example 2 MiB
    /// so that THP can back it.
    pub fn align(mut self, align: usize) -> Self {
        self.align = align.max(PAGE_SIZE);
        self
    }

    /// Fault every page in at creation (`MAP_POPULATE`).
    pub fn populate(mut self, populate: bool) -> Self {
        self.populate = populate;
        self
    }

    /// Reserve no swap space for it (`MAP_NORESERVE`): for large areas of
    /// which only a part is ever backed.
    pub fn noreserve(mut self, noreserve: bool) -> Self {
        self.noreserve = noreserve;
        self
    }

    /// Creates the mapping.
    ///
    /// # Errors
    ///
    /// [`MemError::BadLength`] for a zero or unaligned length,
    /// [`MemError::NoHugePages`] when the hugetlb pool is short,
    /// [`MemError::Map`] / [`MemError::Memfd`] for other kernel errors.
    pub fn build(self) -> Result<Mapping, MemError> {
        let page = match self.backing {
            Backing::Hugetlb { page_size, .. } => page_size,
            _ => PAGE_SIZE,
        };
        if !page.is_power_of_two() || page < PAGE_SIZE {
            return Err(MemError::BadHugePageSize { page_size: page });
        }
        if self.len == 0 || self.len % page != 0 || !self.align.is_power_of_two() {
            return Err(MemError::BadLength {
                len: self.len,
                align: page,
            });
        }
        let len = self.len;
        let name = self.backing.name();
        let mut flags = if self.populate {
            MapFlags::POPULATE
        } else {
            MapFlags::empty()
        };
        if self.noreserve {
            flags |= MapFlags::NORESERVE;
        }
        // A memfd made here is owned from the start; a given file is
        // borrowed for the mmap and moved into the mapping afterwards.
        let (made, offset) = match &self.backing {
            Backing::AnonPrivate => {
                flags |= MapFlags::PRIVATE;
                (None, 0)
            }
            Backing::AnonShared => {
                flags |= MapFlags::SHARED;
                (None, 0)
            }
            Backing::Memfd => (Some(memfd(len, MemfdFlags::empty())?), 0),
            Backing::Hugetlb { page_size, shared } => {
                let shift = page_size.trailing_zeros();
                if *shared {
                    let huge = MemfdFlags::HUGETLB | MemfdFlags::from_bits_retain(shift << 26);
                    let fd = memfd(len, huge).map_err(|e| hugetlb_error(e, *page_size))?;
                    (Some(fd), 0)
                } else {
                    flags |= MapFlags::PRIVATE
                        | MapFlags::HUGETLB
                        | MapFlags::from_bits_retain(shift << 26);
                    (None, 0)
                }
            }
            Backing::File { offset, .. } => (None, *offset),
        };
        let file = match &self.backing {
            Backing::File { fd, .. } => Some(fd.as_fd()),
            _ => made.as_ref().map(|f| f.as_fd()),
        };
        if file.is_some() {
            flags |= match self.backing {
                Backing::File { shared: false, .. } => MapFlags::PRIVATE,
                _ => MapFlags::SHARED,
            };
        }
        let addr =
            map(len, self.align, self.prot, flags, file, offset).map_err(|errno| {
                match (&self.backing, errno) {
                    (Backing::Hugetlb { page_size, .. }, Errno::NOMEM) => MemError::NoHugePages {
                        len,
                        page_size: *page_size,
                    },
                    (Backing::Hugetlb { page_size, .. }, Errno::INVAL) => {
                        MemError::BadHugePageSize {
                            page_size: *page_size,
                        }
                    }
                    _ => MemError::Map {
                        len,
                        backing: name,
                        errno,
                    },
                }
            })?;
        let range = PageRange::new(addr, len)?;
        let fd = match self.backing {
            Backing::File { fd, .. } => Some(fd),
            _ => made,
        };
        Ok(Mapping {
            range,
            fd,
            offset,
            backing: name,
            owned: true,
        })
    }
}

/// A hugetlb memfd of a size the kernel does not offer fails with ENODEV
/// or EINVAL.
fn hugetlb_error(e: MemError, page_size: usize) -> MemError {
    match e {
        MemError::Memfd {
            errno: Errno::NODEV | Errno::INVAL,
            ..
        } => MemError::BadHugePageSize { page_size },
        e => e,
    }
}

fn memfd(len: usize, flags: MemfdFlags) -> Result<OwnedFd, MemError> {
    let err = |errno| MemError::Memfd { len, errno };
    let fd = rustix::fs::memfd_create("uhmm", flags | MemfdFlags::CLOEXEC).map_err(err)?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(err)?;
    Ok(fd)
}

/// mmap with an optional alignment: over-map by `align`, then trim.
fn map(
    len: usize,
    align: usize,
    prot: Prot,
    flags: MapFlags,
    fd: Option<BorrowedFd<'_>>,
    offset: u64,
) -> Result<VirtAddr, Errno> {
    let extra = if align > PAGE_SIZE { align } else { 0 };
    let total = len.checked_add(extra).ok_or(Errno::NOMEM)?;
    // SAFETY: a new mapping at an address the kernel chooses replaces
    // nothing; the result is only used as a raw address.
    let ptr = unsafe {
        match fd {
            Some(fd) => rustix::mm::mmap(
                std::ptr::null_mut(),
                total,
                prot.mmap_flags(),
                flags,
                fd,
                offset,
            ),
            None => {
                rustix::mm::mmap_anonymous(std::ptr::null_mut(), total, prot.mmap_flags(), flags)
            }
        }
    }?;
    let base = VirtAddr::from_ptr(ptr);
    if extra == 0 {
        return Ok(base);
    }
    let start = base.checked_align_up(align).ok_or(Errno::NOMEM)?;
    let head = start.get() - base.get();
    let tail = extra - head;
    // SAFETY: the head and tail trimmed here are parts of the mapping just
    // created, which nothing else knows about.
    unsafe {
        if head > 0 {
            rustix::mm::munmap(base.as_mut_ptr(), head)?;
        }
        if tail > 0 {
            rustix::mm::munmap(
                start.checked_add(len).ok_or(Errno::NOMEM)?.as_mut_ptr(),
                tail,
            )?;
        }
    }
    Ok(start)
}

/// A mapping of the own process, unmapped on drop (when owned).
///
/// It never hands out references into its memory; see the module docs.
pub struct Mapping {
    range: PageRange,
    fd: Option<OwnedFd>,
    offset: u64,
    backing: &'static str,
    owned: bool,
}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("range", &self.range)
            .field("backing", &self.backing)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Mapping {
    /// A builder for a mapping of `len` bytes.
    pub fn builder(len: usize) -> MappingBuilder {
        MappingBuilder {
            len,
            backing: Backing::AnonPrivate,
            prot: Prot::RW,
            align: PAGE_SIZE,
            populate: false,
            noreserve: false,
        }
    }

    /// A private anonymous read-write mapping of `len` bytes.
    pub fn anon(len: usize) -> Result<Mapping, MemError> {
        Self::builder(len).build()
    }

    /// The pages mapped.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Always `false`: mappings are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first byte, as a raw pointer. Dereferencing it is the caller's
    /// business: the memory may change at any time (other threads, devices).
    pub fn as_ptr(&self) -> *mut u8 {
        self.range.start().as_mut_ptr()
    }

    /// The file behind a memfd, hugetlb-memfd or file mapping.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// A description of the backing memory.
    pub fn backing_name(&self) -> &'static str {
        self.backing
    }

    /// The sub-range `len` bytes long, `offset` bytes in.
    pub fn sub(&self, offset: usize, len: usize) -> Result<PageRange, MemError> {
        self.range
            .subrange(offset, len)
            .ok_or_else(|| MemError::OutOfBounds {
                what: format!("{len:#x} bytes at offset {offset:#x}"),
                mapping: self.range,
            })
    }

    fn check(&self, range: PageRange) -> Result<(), MemError> {
        if self.range.contains_range(range) {
            Ok(())
        } else {
            Err(MemError::OutOfBounds {
                what: range.to_string(),
                mapping: self.range,
            })
        }
    }

    fn check_bytes(&self, offset: usize, len: usize) -> Result<VirtAddr, MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(VirtAddr::new(self.range.start().get() + offset)),
            _ => Err(MemError::OutOfBounds {
                what: format!("{len} bytes at offset {offset:#x}"),
                mapping: self.range,
            }),
        }
    }

    /// `madvise` on `range`, which must lie inside the mapping.
    pub fn advise(&self, range: PageRange, advice: Advice) -> Result<(), MemError> {
        self.check(range)?;
        // SAFETY: the mapping hands out no references into its memory, so
        // discarding its contents cannot invalidate one.
        unsafe { madvise(range, advice) }
    }

    /// `mprotect` on `range`, which must lie inside the mapping.
    pub fn protect(&self, range: PageRange, prot: Prot) -> Result<(), MemError> {
        self.check(range)?;
        // SAFETY: as for `advise`: no reference into the mapping exists.
        unsafe { mprotect(range, prot) }
    }

    /// Copies `buf.len()` bytes from `offset` in the mapping into `buf`,
    /// through the kernel (see [`read_process`]).
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        let addr = self.check_bytes(offset, buf.len())?;
        Ok(read_process(addr, buf)?)
    }

    /// Copies `buf` to `offset` in the mapping, through the kernel (see
    /// [`write_process`]).
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        let addr = self.check_bytes(offset, buf.len())?;
        // SAFETY: no reference into the mapping exists (module docs).
        Ok(unsafe { write_process(addr, buf) }?)
    }

    /// A second mapping of the same shared memory (memfd, shared hugetlb or
    /// file), read-write and shared, over the whole length: a write through
    /// either is seen through the other. A device can use it as an alias
    /// that no userfaultfd registration of this mapping affects.
    pub fn alias(&self) -> Result<Mapping, MemError> {
        let fd = self.fd.as_ref().ok_or(MemError::NoFile {
            mapping: self.range,
        })?;
        let fd = fd.try_clone().map_err(|e| MemError::Map {
            len: self.len(),
            backing: self.backing,
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        })?;
        Mapping::builder(self.len())
            .backing(Backing::File {
                fd,
                offset: self.offset,
                shared: true,
            })
            .build()
    }

    /// Gives up ownership: the memory stays mapped after the `Mapping` is
    /// gone, and its range is returned.
    pub fn leak(mut self) -> PageRange {
        self.owned = false;
        self.range
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: the mapping owns its range and no reference into it
            // exists. An error (the caller unmapped it behind our back) is
            // ignored: there is nothing left to release.
            let _ = unsafe { rustix::mm::munmap(self.range.start().as_mut_ptr(), self.len()) };
        }
    }
}

/// `madvise(range, advice)`.
///
/// # Safety
///
/// For a destructive advice ([`Advice::is_destructive`]) no Rust reference
/// may point into `range`: its contents change.
pub unsafe fn madvise(range: PageRange, advice: Advice) -> Result<(), MemError> {
    // SAFETY: the caller guarantees that no reference is invalidated; the
    // kernel validates the range.
    let res = unsafe {
        rustix::mm::madvise(
            range.start().as_mut_ptr::<c_void>(),
            range.len(),
            advice.raw(),
        )
    };
    if matches!(advice, Advice::DontNeed | Advice::Remove) {
        crate::record::note(
            crate::record::What::Discard,
            range.start().get(),
            0,
            range.len(),
            res.err().map_or(0, |e| e.raw_os_error() as u16),
            0,
        );
    }
    res.map_err(|errno| MemError::Advise {
        range,
        advice,
        errno,
    })
}

/// Faults `range` in, for writing or reading (`MADV_POPULATE_*`), as a
/// program's accesses would. Contents do not change. On a range registered
/// with a userfaultfd this raises its faults, so never call it from the
/// thread that serves them.
pub fn populate(range: PageRange, write: bool) -> Result<(), MemError> {
    let advice = if write {
        Advice::PopulateWrite
    } else {
        Advice::PopulateRead
    };
    // SAFETY: populating is not destructive.
    unsafe { madvise(range, advice) }
}

/// `mprotect(range, prot)`.
///
/// # Safety
///
/// Removing write access under a `&mut` reference, or read access under any
/// reference, turns a later use of it into a crash: no reference may point
/// into `range` whose use the new protection forbids.
pub unsafe fn mprotect(range: PageRange, prot: Prot) -> Result<(), MemError> {
    // SAFETY: the caller guarantees that no reference is invalidated.
    unsafe {
        rustix::mm::mprotect(
            range.start().as_mut_ptr::<c_void>(),
            range.len(),
            prot.mprotect_flags(),
        )
    }
    .map_err(|errno| MemError::Protect { range, prot, errno })
}

/// Reads `buf.len()` bytes at `addr` of the own process with
/// `process_vm_readv`: an unmapped or unreadable address is an
/// [`AccessError`] (EFAULT), not a crash. A hole in a range registered with
/// a userfaultfd raises a fault there, which its service must resolve, so
/// never call this from the thread that serves it.
pub fn read_process(addr: VirtAddr, buf: &mut [u8]) -> Result<(), AccessError> {
    let len = buf.len();
    let base = buf.as_mut_ptr();
    transfer(addr, len, |done, remote| {
        let local = libc::iovec {
            // `done < len`, so this stays inside `buf`.
            iov_base: base.wrapping_add(done).cast(),
            iov_len: len - done,
        };
        // SAFETY: `local` describes the tail of `buf`, which is writable;
        // the kernel checks `remote` and reports EFAULT for bad addresses.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, remote, 1, 0) }
    })
}

/// Writes `buf` at `addr` of the own process with `process_vm_writev`:
/// unmapped or read-only memory is an [`AccessError`] (EFAULT), not a crash
/// (a read-only page is not written even though the kernel could).
///
/// # Safety
///
/// No Rust reference may point into the bytes written (they change under
/// it); use it for memory the program reaches only through raw pointers,
/// as a device does.
pub unsafe fn write_process(addr: VirtAddr, buf: &[u8]) -> Result<(), AccessError> {
    let len = buf.len();
    transfer(addr, len, |done, remote| {
        let local = libc::iovec {
            iov_base: buf[done..].as_ptr() as *mut c_void,
            iov_len: len - done,
        };
        // SAFETY: `local` describes the tail of `buf`, readable; the caller
        // guarantees no reference covers the destination.
        unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, remote, 1, 0) }
    })
}

/// Runs `op(done, remote)` until `len` bytes moved; a short transfer is
/// retried from where it stopped, and the next error is reported with the
/// count done so far. `process_vm_readv`/`writev` report any failure to
/// pin the pages as EFAULT, including a transient one while the address
/// space is being changed (seen once in CI, with another thread forking):
/// an EFAULT that makes no progress is tried [`EFAULT_TRIES`] times before
/// it is believed; a page that truly cannot be reached fails every time.
fn transfer(
    addr: VirtAddr,
    len: usize,
    mut op: impl FnMut(usize, *const libc::iovec) -> isize,
) -> Result<(), AccessError> {
    let mut done = 0;
    let mut faults = 0;
    while done < len {
        let remote = libc::iovec {
            iov_base: (addr.get().wrapping_add(done)) as *mut c_void,
            iov_len: len - done,
        };
        let n = op(done, &remote);
        if n < 0 {
            let errno = Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            );
            if errno == Errno::INTR {
                continue;
            }
            if errno == Errno::FAULT && faults + 1 < EFAULT_TRIES {
                faults += 1;
                std::thread::yield_now();
                continue;
            }
            return Err(AccessError {
                addr,
                len,
                done,
                errno,
            });
        }
        if n == 0 {
            return Err(AccessError {
                addr,
                len,
                done,
                errno: Errno::FAULT,
            });
        }
        done += n as usize;
        faults = 0;
    }
    Ok(())
}

/// How often [`transfer`] tries an access that fails with EFAULT.
const EFAULT_TRIES: usize = 3;

mod plain {
    pub trait Sealed {}
}

/// Plain data: a type every bit pattern of which is a valid value, with no
/// padding and no pointers — what may be read from and written to memory
/// that devices and migrations change behind the program's back
/// ([`volatile_load`], and the safe accessors of managed regions).
/// Implemented for the integer and float types and arrays of them; sealed.
pub trait Plain: Copy + plain::Sealed {}

macro_rules! plain {
    ($($t:ty)*) => {$(
        impl plain::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(u8 u16 u32 u64 u128 usize i8 i16 i32 i64 i128 isize f32 f64);
impl<T: Plain, const N: usize> plain::Sealed for [T; N] {}
impl<T: Plain, const N: usize> Plain for [T; N] {}

/// A volatile load of a `T` at `addr`: one access the compiler neither
/// elides nor merges, as for device-shared memory.
///
/// # Safety
///
/// `addr` must be aligned for `T` and the `size_of::<T>()` bytes from it
/// must lie in a readable mapping of the process that stays mapped for the
/// call (the access may fault, and is then served like any CPU access).
pub unsafe fn volatile_load<T: Plain>(addr: VirtAddr) -> T {
    // SAFETY: the caller's contract: aligned and mapped; `T: Plain` makes
    // any bytes found there a valid `T`.
    unsafe { std::ptr::read_volatile(addr.as_ptr::<T>()) }
}

/// A volatile store of `value` at `addr` (see [`volatile_load`]).
///
/// # Safety
///
/// As [`volatile_load`], and the mapping must be writable; no Rust
/// reference may point into those bytes.
pub unsafe fn volatile_store<T: Plain>(addr: VirtAddr, value: T) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::write_volatile(addr.as_mut_ptr::<T>(), value) }
}

/// Copies `buf.len()` bytes from `addr` into `buf` with volatile loads
/// (words where aligned, bytes at the edges).
///
/// # Safety
///
/// As [`volatile_load`] for every byte of the range.
pub unsafe fn volatile_read(addr: VirtAddr, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let a = VirtAddr::new(addr.get() + i);
        if a.is_aligned(8) && buf.len() - i >= 8 {
            // SAFETY: aligned, inside the caller's range.
            let w: u64 = unsafe { volatile_load(a) };
            buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: inside the caller's range.
            buf[i] = unsafe { volatile_load(a) };
            i += 1;
        }
    }
}

/// Copies `buf` to `addr` with volatile stores (see [`volatile_read`]).
///
/// # Safety
///
/// As [`volatile_store`] for every byte of the range.
pub unsafe fn volatile_write(addr: VirtAddr, buf: &[u8]) {
    let mut i = 0;
    while i < buf.len() {
        let a = VirtAddr::new(addr.get() + i);
        if a.is_aligned(8) && buf.len() - i >= 8 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&buf[i..i + 8]);
            // SAFETY: aligned, inside the caller's range.
            unsafe { volatile_store(a, u64::from_ne_bytes(w)) };
            i += 8;
        } else {
            // SAFETY: inside the caller's range.
            unsafe { volatile_store(a, buf[i]) };
            i += 1;
        }
    }
}
