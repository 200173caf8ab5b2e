//! What the running kernel offers uhmm: the facts behind `uhmm info`.
//!
//! [`Report::probe`] tries each interface for real (opens a userfaultfd each
//! way, issues `PAGEMAP_SCAN` and `PROCMAP_QUERY`) rather than trusting
//! version numbers, and [`Report::missing`] turns every gap into one line:
//! what will not work, and how to enable it.

use crate::sys::pagemap::{Pagemap, PagemapBackend};
use crate::sys::procmap::{Procmap, ProcmapBackend};
use crate::sys::uffd::{Access, AccessPolicy, Features, OpenError, Uffd};
use rustix::io::Errno;

/// The running kernel's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelVersion {
    /// `uname -r`.
    pub release: String,
    /// `(major, minor, patch)` parsed from it.
    pub version: (u32, u32, u32),
}

impl KernelVersion {
    /// The running kernel's version.
    pub fn current() -> Self {
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let version = parse_release(&release);
        Self { release, version }
    }
}

fn parse_release(release: &str) -> (u32, u32, u32) {
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse().unwrap_or(0));
    (
        nums.next().unwrap_or(0),
        nums.next().unwrap_or(0),
        nums.next().unwrap_or(0),
    )
}

/// One huge page pool (`/sys/kernel/mm/hugepages/hugepages-<size>kB`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePool {
    /// The page size in bytes.
    pub page_size: usize,
    /// Pages reserved.
    pub total: u64,
    /// Pages free.
    pub free: u64,
}

/// Each way of obtaining a userfaultfd, and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UffdAccess {
    /// The way.
    pub access: Access,
    /// `Ok` or the error it gave.
    pub result: Result<(), Errno>,
}

/// Everything `uhmm info` reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// The kernel.
    pub kernel: KernelVersion,
    /// Each way of obtaining a userfaultfd.
    pub uffd_access: Vec<UffdAccess>,
    /// The way uhmm would use (the first that works), if any.
    pub uffd_chosen: Option<Access>,
    /// The userfaultfd features the kernel offers (empty if none could be opened).
    pub uffd_features: Features,
    /// Whether EVENT_FORK may be enabled (it needs `CAP_SYS_PTRACE`).
    pub event_fork_permitted: bool,
    /// `vm.unprivileged_userfaultfd`, if readable.
    pub unprivileged_userfaultfd: Option<u32>,
    /// Whether the `PAGEMAP_SCAN` ioctl works.
    pub pagemap_scan: bool,
    /// Whether the `PROCMAP_QUERY` ioctl works.
    pub procmap_query: bool,
    /// The THP mode (`always`, `madvise` or `never`), if readable.
    pub thp: Option<String>,
    /// The huge page pools.
    pub hugetlb: Vec<HugePool>,
    /// Whether the process runs as root (page frame numbers, hugetlb reservation).
    pub root: bool,
}

/// What works and what does not when uhmm's userfaultfd is
/// user-mode-only ([`Access::UserModeOnly`]; README, "Requirements", and
/// DESIGN.md, "Unprivileged use", say the same).
pub const USER_MODE_ONLY_IMPACT: &str = "CPU loads and stores, migrations, device access, \
    exclusive access and fork work, and so do system calls on pages in the CPU page table \
    (never-touched pages included: uhmm maps them when a region is first migrated); but a \
    system call (read(2) into, write(2) from, process_vm_readv/writev, O_DIRECT I/O) touching \
    a managed page that is not in the CPU page table (on a device, held exclusive by one, \
    being migrated, or discarded with MADV_DONTNEED/MADV_FREE since its region was first \
    migrated and not touched by the CPU since) fails with EFAULT instead of bringing the page \
    back, because the kernel does not report faults raised inside it to such a userfaultfd";

/// How to get a userfaultfd that serves kernel-mode faults.
pub const KERNEL_FAULTS_FIX: &str = "run as root, or give this user read-write access to \
    /dev/userfaultfd (`setfacl -m u:USER:rw /dev/userfaultfd`), or \
    `sysctl vm.unprivileged_userfaultfd=1`; a program can refuse to start without it \
    (`Mm::with_access(AccessPolicy::FullOnly)`)";

/// One thing that is missing, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What is missing.
    pub item: String,
    /// What will not work without it.
    pub impact: String,
    /// How to enable it.
    pub fix: String,
}

impl Report {
    /// Probes the running kernel.
    pub fn probe() -> Report {
        let uffd_access: Vec<UffdAccess> = [Access::DevNode, Access::Syscall, Access::UserModeOnly]
            .into_iter()
            .map(|access| UffdAccess {
                access,
                result: Uffd::builder()
                    .access(AccessPolicy::Only(access))
                    .open()
                    .map(|_| ())
                    .map_err(|e| match e {
                        OpenError::Unavailable { attempts, .. } => {
                            attempts.first().map_or(Errno::NOSYS, |a| a.1)
                        }
                        OpenError::Handshake { errno, .. } => errno,
                        _ => Errno::INVAL,
                    }),
            })
            .collect();
        let uffd_chosen = uffd_access
            .iter()
            .find(|a| a.result.is_ok())
            .map(|a| a.access);
        let opened = Uffd::builder().open().ok();
        let uffd_features = opened
            .as_ref()
            .map_or(Features::empty(), |u| u.supported_features());
        let event_fork_permitted = Uffd::builder()
            .features(Features::EVENT_FORK)
            .open()
            .is_ok();
        Report {
            kernel: KernelVersion::current(),
            uffd_access,
            uffd_chosen,
            uffd_features,
            event_fork_permitted,
            unprivileged_userfaultfd: read_number("/proc/sys/vm/unprivileged_userfaultfd")
                .map(|n| n as u32),
            pagemap_scan: Pagemap::open().is_ok_and(|p| p.backend() == PagemapBackend::Scan),
            procmap_query: Procmap::open().is_ok_and(|p| p.backend() == ProcmapBackend::Query),
            thp: std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .ok()
                .and_then(|s| selected_mode(&s)),
            hugetlb: huge_pools(),
            root: rustix::process::geteuid().is_root(),
        }
    }

    /// The features uhmm uses that are missing, each with its impact.
    /// (EVENT_FORK is not one: a fork hook brings device pages home before
    /// a fork, in every mode, so a child sees them without it.)
    pub fn missing_features(&self) -> Features {
        let used =
            Features::all() - Features::SIGBUS - Features::EXACT_ADDRESS - Features::EVENT_FORK;
        used - self.uffd_features
    }

    /// Every gap, as one line each: what will not work and how to enable it.
    pub fn missing(&self) -> Vec<Missing> {
        let mut out = Vec::new();
        match self.uffd_chosen {
            None => out.push(Missing {
                item: "userfaultfd".into(),
                impact: "nothing: uhmm cannot manage memory at all".into(),
                fix: "run as root, or `chmod 0666 /dev/userfaultfd`, or `sysctl vm.unprivileged_userfaultfd=1` (and check CONFIG_USERFAULTFD)".into(),
            }),
            Some(Access::UserModeOnly) => out.push(Missing {
                item: "userfaultfd for kernel-mode faults".into(),
                impact: USER_MODE_ONLY_IMPACT.into(),
                fix: KERNEL_FAULTS_FIX.into(),
            }),
            Some(_) => {}
        }
        if self.uffd_chosen.is_some() {
            for f in self.missing_features().iter() {
                out.push(Missing {
                    item: format!("userfaultfd feature {}", feature_name(f)),
                    impact: format!("cannot {}", f.purpose()),
                    fix: "use Linux 6.8 or newer".into(),
                });
            }
        }
        if !self.pagemap_scan {
            out.push(Missing {
                item: "PAGEMAP_SCAN".into(),
                impact: "page-table snapshots fall back to /proc/self/pagemap (slower; PFNZERO/HUGE need root)".into(),
                fix: "use Linux 6.7 or newer".into(),
            });
        }
        if !self.procmap_query {
            out.push(Missing {
                item: "PROCMAP_QUERY".into(),
                impact: "mapping look-ups fall back to parsing /proc/self/smaps (much slower)"
                    .into(),
                fix: "use Linux 6.11 or newer".into(),
            });
        }
        match self.thp.as_deref() {
            Some("always" | "madvise") => {}
            _ => out.push(Missing {
                item: "transparent huge pages".into(),
                impact: "no THP-backed regions; migration granules stay at 4 KiB".into(),
                fix: "`echo madvise > /sys/kernel/mm/transparent_hugepage/enabled`".into(),
            }),
        }
        if self.hugetlb.iter().all(|p| p.free == 0) {
            out.push(Missing {
                item: "free hugetlb pages".into(),
                impact: "hugetlb-backed regions cannot be allocated".into(),
                fix: "`echo 16 > /proc/sys/vm/nr_hugepages` (root)".into(),
            });
        }
        out
    }
}

/// The constant's name, as in the uapi header.
pub fn feature_name(f: Features) -> String {
    f.iter_names().map(|(n, _)| n).collect::<Vec<_>>().join("|")
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The bracketed choice of a sysfs mode line such as `always [madvise] never`.
fn selected_mode(line: &str) -> Option<String> {
    let start = line.find('[')? + 1;
    let end = start + line[start..].find(']')?;
    Some(line[start..end].to_owned())
}

fn huge_pools() -> Vec<HugePool> {
    let Ok(dir) = std::fs::read_dir("/sys/kernel/mm/hugepages") else {
        return Vec::new();
    };
    let mut pools: Vec<HugePool> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: usize = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            let path = e.path();
            Some(HugePool {
                page_size: kb * 1024,
                total: read_number(&format!("{}/nr_hugepages", path.display()))?,
                free: read_number(&format!("{}/free_hugepages", path.display()))?,
            })
        })
        .collect();
    pools.sort_by_key(|p| p.page_size);
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_modes() {
        assert_eq!(parse_release("6.18.44-fc-v657"), (6, 18, 44));
        assert_eq!(parse_release("6.1"), (6, 1, 0));
        assert_eq!(
            selected_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(selected_mode("nothing"), None);
    }

    #[test]
    fn every_used_feature_has_a_purpose() {
        for (name, f) in Features::all().iter_names() {
            assert!(!f.purpose().is_empty(), "{name}");
        }
    }
}
