//! The mappings (VMAs) of the own process: `PROCMAP_QUERY` (6.11+) on
//! `/proc/self/maps`, with a parser of `/proc/self/smaps` as fallback.
//!
//! ```no_run
//! use uhmm::sys::procmap::Procmap;
//! use uhmm::VirtAddr;
//!
//! let maps = Procmap::open()?;
//! let here = VirtAddr::from_ptr(&maps as *const _);
//! let vma = maps.query(here)?.expect("the stack is mapped");
//! println!("{} {:?} shared={} kind={:?}", vma.range, vma.perms, vma.shared, vma.kind());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The descriptor refers to the process that opened it: after `fork`, the
//! child must open its own.

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::sys::mem::Prot;
use linux_raw_sys::general as uapi;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, opcode};
use std::os::fd::{AsFd, OwnedFd};

/// `_IOWR(PROCFS_IOCTL_MAGIC, 17, struct procmap_query)`
pub(crate) const PROCMAP_QUERY: Opcode = opcode::read_write::<uapi::procmap_query>(b'f', 17);

const COVERING_OR_NEXT: u64 = uapi::procmap_query_flags::PROCMAP_QUERY_COVERING_OR_NEXT_VMA as u64;
const VMA_READABLE: u64 = uapi::procmap_query_flags::PROCMAP_QUERY_VMA_READABLE as u64;
const VMA_WRITABLE: u64 = uapi::procmap_query_flags::PROCMAP_QUERY_VMA_WRITABLE as u64;
const VMA_EXECUTABLE: u64 = uapi::procmap_query_flags::PROCMAP_QUERY_VMA_EXECUTABLE as u64;
const VMA_SHARED: u64 = uapi::procmap_query_flags::PROCMAP_QUERY_VMA_SHARED as u64;
const NAME_MAX: usize = 4096 + 64;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// One mapping (VMA) of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    /// The pages it spans.
    pub range: PageRange,
    /// What it allows.
    pub perms: Prot,
    /// `MAP_SHARED` (otherwise private).
    pub shared: bool,
    /// Offset into the mapped file, in bytes (0 for anonymous memory).
    pub offset: u64,
    /// Inode of the mapped file (0 for private anonymous memory).
    pub inode: u64,
    /// Device of the mapped file, `(major, minor)`.
    pub dev: (u32, u32),
    /// The page size the kernel maps it with: larger than [`PAGE_SIZE`] for
    /// hugetlb.
    pub page_size: usize,
    /// The path or the pseudo-name (`[heap]`, `[vdso]`, `/memfd:x (deleted)`).
    pub name: Option<String>,
}

/// What kind of memory a mapping is, as far as uhmm cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmaKind {
    /// Private anonymous memory (`[heap]`, `[stack]` and nameless maps).
    AnonPrivate,
    /// Shared anonymous memory (shmem behind `/dev/zero`).
    AnonShared,
    /// A file: memfd, tmpfs or a regular file (see [`Vma::is_shmem`]).
    File,
    /// hugetlb memory (anonymous or hugetlbfs).
    Hugetlb {
        /// The huge page size.
        page_size: usize,
    },
    /// A special mapping (`[vdso]`, `[vvar]`, `[vsyscall]`).
    Special,
}

impl Vma {
    /// The kind of memory.
    pub fn kind(&self) -> VmaKind {
        if self.page_size > PAGE_SIZE {
            return VmaKind::Hugetlb {
                page_size: self.page_size,
            };
        }
        let name = self.name.as_deref().unwrap_or("");
        if self.inode == 0 {
            let anon_named = name.is_empty()
                || name == "[heap]"
                || name.starts_with("[stack")
                || name.starts_with("[anon");
            return match (anon_named, self.shared) {
                (true, false) => VmaKind::AnonPrivate,
                (true, true) => VmaKind::AnonShared,
                (false, _) => VmaKind::Special,
            };
        }
        if name.starts_with("/dev/zero") || name.starts_with("/SYSV") {
            return VmaKind::AnonShared;
        }
        VmaKind::File
    }

    /// Whether the memory is shmem (shared anonymous, memfd, SysV, tmpfs),
    /// which userfaultfd can register like anonymous memory.
    pub fn is_shmem(&self) -> bool {
        let Some(name) = self.name.as_deref() else {
            return false;
        };
        if name.starts_with("/memfd:") || name.starts_with("/dev/zero") || name.starts_with("/SYSV")
        {
            return true;
        }
        let path = name.strip_suffix(" (deleted)").unwrap_or(name);
        // A deleted (or O_TMPFILE) file is gone from its directory: the
        // directory's file system is the file's.
        let dir = std::path::Path::new(path).parent();
        rustix::fs::statfs(path)
            .or_else(|e| dir.map_or(Err(e), rustix::fs::statfs))
            .is_ok_and(|s| s.f_type == TMPFS_MAGIC)
    }
}

/// Why the mappings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcmapError {
    /// `/proc/self/maps` or `/proc/self/smaps` could not be opened or read.
    #[error("cannot read {path}: {errno} (is /proc mounted?)")]
    Open {
        /// The file.
        path: &'static str,
        /// The error.
        errno: Errno,
    },
    /// `PROCMAP_QUERY` failed for another reason than "no mapping".
    #[error("PROCMAP_QUERY at {addr} failed: {errno}")]
    Query {
        /// The address asked about.
        addr: VirtAddr,
        /// The error.
        errno: Errno,
    },
    /// A line of `/proc/self/smaps` could not be parsed.
    #[error("cannot parse /proc/self/smaps line {line:?}")]
    Parse {
        /// The line.
        line: String,
    },
}

/// How [`Procmap`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProcmapBackend {
    /// The `PROCMAP_QUERY` ioctl: one VMA per call, no text parsing.
    Query,
    /// Parsing `/proc/self/smaps` (kernels before 6.11).
    Smaps,
}

/// A handle on the own process's mappings.
#[derive(Debug)]
pub struct Procmap {
    maps: OwnedFd,
    backend: ProcmapBackend,
}

impl Procmap {
    /// Opens `/proc/self/maps` and uses `PROCMAP_QUERY` if the kernel has it,
    /// the smaps parser otherwise.
    pub fn open() -> Result<Self, ProcmapError> {
        let mut p = Self::with_backend(ProcmapBackend::Query)?;
        if p.raw_query(VirtAddr::new(0), COVERING_OR_NEXT, false) == Err(Errno::NOTTY) {
            p.backend = ProcmapBackend::Smaps;
        }
        Ok(p)
    }

    /// Opens with the given backend, whether or not the kernel has it (for
    /// tests and `uhmm info`).
    pub fn with_backend(backend: ProcmapBackend) -> Result<Self, ProcmapError> {
        let path = "/proc/self/maps";
        let maps = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|errno| ProcmapError::Open { path, errno })?;
        Ok(Self { maps, backend })
    }

    /// The backend in use.
    pub fn backend(&self) -> ProcmapBackend {
        self.backend
    }

    /// The mapping that contains `addr`, or `None` if `addr` lies in a gap.
    pub fn query(&self, addr: VirtAddr) -> Result<Option<Vma>, ProcmapError> {
        self.find(addr, false)
    }

    /// The mapping that contains `addr`, or else the first one above it.
    pub fn query_next(&self, addr: VirtAddr) -> Result<Option<Vma>, ProcmapError> {
        self.find(addr, true)
    }

    /// Every mapping that overlaps `range`, in address order.
    pub fn covering(&self, range: PageRange) -> Result<Vec<Vma>, ProcmapError> {
        let mut out = Vec::new();
        let mut cursor = range.start();
        while cursor < range.end() {
            let Some(vma) = self.query_next(cursor)? else {
                break;
            };
            if vma.range.start() >= range.end() {
                break;
            }
            cursor = vma.range.end();
            out.push(vma);
        }
        Ok(out)
    }

    fn find(&self, addr: VirtAddr, or_next: bool) -> Result<Option<Vma>, ProcmapError> {
        match self.backend {
            ProcmapBackend::Query => {
                match self.raw_query(addr, if or_next { COVERING_OR_NEXT } else { 0 }, true) {
                    Ok(vma) => Ok(vma),
                    // ENOENT: no mapping there.
                    Err(Errno::NOENT) => Ok(None),
                    Err(errno) => Err(ProcmapError::Query { addr, errno }),
                }
            }
            ProcmapBackend::Smaps => Ok(read_smaps()?
                .into_iter()
                .find(|v| v.range.contains(addr) || (or_next && v.range.start() > addr))),
        }
    }

    fn raw_query(&self, addr: VirtAddr, flags: u64, with_name: bool) -> Result<Option<Vma>, Errno> {
        let mut name = [0u8; NAME_MAX];
        let mut q = uapi::procmap_query {
            size: std::mem::size_of::<uapi::procmap_query>() as u64,
            query_flags: flags,
            query_addr: addr.get() as u64,
            vma_start: 0,
            vma_end: 0,
            vma_flags: 0,
            vma_page_size: 0,
            vma_offset: 0,
            inode: 0,
            dev_major: 0,
            dev_minor: 0,
            vma_name_size: if with_name { NAME_MAX as u32 } else { 0 },
            build_id_size: 0,
            vma_name_addr: if with_name {
                name.as_mut_ptr() as u64
            } else {
                0
            },
            build_id_addr: 0,
        };
        // SAFETY: PROCMAP_QUERY takes a `struct procmap_query`; the name
        // buffer it points to is live and `vma_name_size` bytes long.
        unsafe { super::ioctl_update::<PROCMAP_QUERY, _>(self.maps.as_fd(), &mut q) }?;
        let Ok(range) = PageRange::from_bounds(
            VirtAddr::new(q.vma_start as usize),
            VirtAddr::new(q.vma_end as usize),
        ) else {
            return Err(Errno::INVAL);
        };
        let name = (with_name && q.vma_name_size > 0).then(|| {
            // `vma_name_size` counts the terminating NUL.
            let len = (q.vma_name_size as usize - 1).min(NAME_MAX);
            String::from_utf8_lossy(&name[..len]).into_owned()
        });
        let mut perms = Prot::empty();
        perms.set(Prot::READ, q.vma_flags & VMA_READABLE != 0);
        perms.set(Prot::WRITE, q.vma_flags & VMA_WRITABLE != 0);
        perms.set(Prot::EXEC, q.vma_flags & VMA_EXECUTABLE != 0);
        Ok(Some(Vma {
            range,
            perms,
            shared: q.vma_flags & VMA_SHARED != 0,
            offset: q.vma_offset,
            inode: q.inode,
            dev: (q.dev_major, q.dev_minor),
            page_size: q.vma_page_size as usize,
            name,
        }))
    }
}

/// Reads and parses all of `/proc/self/smaps`.
fn read_smaps() -> Result<Vec<Vma>, ProcmapError> {
    let path = "/proc/self/smaps";
    let text = std::fs::read_to_string(path).map_err(|e| ProcmapError::Open {
        path,
        errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
    })?;
    parse_smaps(&text)
}

fn parse_smaps(text: &str) -> Result<Vec<Vma>, ProcmapError> {
    let bad = |line: &str| ProcmapError::Parse {
        line: line.to_owned(),
    };
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("KernelPageSize:") {
            let kb: usize = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .map_err(|_| bad(line))?;
            if let Some(last) = out.last_mut() {
                last.page_size = kb * 1024;
            }
            continue;
        }
        // A header line: "start-end perms offset major:minor inode [name]".
        let mut f = line.splitn(6, ' ');
        let (Some(span), Some(perms), Some(offset), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((start, end)) = span.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let range = PageRange::from_bounds(VirtAddr::new(start), VirtAddr::new(end))
            .map_err(|_| bad(line))?;
        let p = perms.as_bytes();
        if p.len() != 4 {
            return Err(bad(line));
        }
        let mut pm = Prot::empty();
        pm.set(Prot::READ, p[0] == b'r');
        pm.set(Prot::WRITE, p[1] == b'w');
        pm.set(Prot::EXEC, p[2] == b'x');
        let (major, minor) = dev.split_once(':').ok_or_else(|| bad(line))?;
        let name = f
            .next()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        out.push(Vma {
            range,
            perms: pm,
            shared: p[3] == b's',
            offset: u64::from_str_radix(offset, 16).map_err(|_| bad(line))?,
            inode: inode.parse().map_err(|_| bad(line))?,
            dev: (
                u32::from_str_radix(major, 16).map_err(|_| bad(line))?,
                u32::from_str_radix(minor, 16).map_err(|_| bad(line))?,
            ),
            page_size: PAGE_SIZE,
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps() {
        let text = "\
7f0000000000-7f0000200000 rw-s 00000000 00:10 1234                       /anon_hugepage (deleted)
Size:               2048 kB
KernelPageSize:     2048 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
KernelPageSize:        4 kB
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0                          [vdso]
7ffd00200000-7ffd00201000 ---p 00001000 fd:01 99 /usr/lib/x.so
";
        let v = parse_smaps(text).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].kind(), VmaKind::Hugetlb { page_size: 2 << 20 });
        assert!(v[0].shared);
        assert_eq!(v[1].kind(), VmaKind::AnonPrivate);
        assert_eq!(v[1].perms, Prot::READ | Prot::WRITE);
        assert_eq!(v[2].kind(), VmaKind::Special);
        assert_eq!(v[3].kind(), VmaKind::File);
        assert_eq!((v[3].offset, v[3].inode, v[3].dev), (0x1000, 99, (0xfd, 1)));
        assert_eq!(v[3].perms, Prot::empty());
    }

    #[test]
    fn rejects_garbage_headers() {
        assert!(parse_smaps("7f0000001000-7f0000000000 rw-p 0 00:00 0\n").is_err());
        assert!(parse_smaps("7f0000000000-7f0000001000 rw-p zz 00:00 0\n").is_err());
    }

    #[test]
    fn procmap_query_opcode() {
        assert_eq!(PROCMAP_QUERY, 0xc068_6611);
    }
}
