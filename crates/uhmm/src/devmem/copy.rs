//! Copy engines: how page data moves between system memory and a device's
//! memory during migration.
//!
//! A [`CopyEngine`] copies a batch of jobs, each a source and a destination
//! of the same length. Migration hands it whole batches (64 KiB–2 MiB
//! granules and larger), never one call per page. [`CpuCopyEngine`] is the
//! software device's engine: `memcpy` on the calling thread, split across
//! several threads when a batch is large; [`FailingEngine`] wraps another
//! engine to inject failures in tests.
//!
//! ```
//! use uhmm::devmem::copy::{CopyEngine, CopyJob, CpuCopyEngine};
//!
//! let src = vec![7u8; 1 << 20];
//! let mut dst = vec![0u8; 1 << 20];
//! CpuCopyEngine::new().copy(&mut [CopyJob { src: &src, dst: &mut dst }])?;
//! assert_eq!(src, dst);
//! # Ok::<(), uhmm::devmem::copy::CopyError>(())
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One copy: `src` into `dst`, which have the same length.
#[derive(Debug)]
pub struct CopyJob<'a> {
    /// Where the data comes from.
    pub src: &'a [u8],
    /// Where it goes.
    pub dst: &'a mut [u8],
}

/// Why a batch was not copied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// A job's source and destination differ in length; nothing was copied.
    #[error("copy job {index}: the source is {src} bytes but the destination {dst}")]
    LengthMismatch {
        /// The job.
        index: usize,
        /// Its source's length.
        src: usize,
        /// Its destination's length.
        dst: usize,
    },
    /// The engine failed (a DMA error, or an injected failure). Some jobs
    /// may have been copied; the destinations are unspecified, the sources
    /// unchanged.
    #[error("the copy engine failed: {reason}")]
    Failed {
        /// What the engine reported.
        reason: String,
    },
}

/// Copies batches of page data. Implementations may copy the jobs in any
/// order and in parallel; `copy` returns when all are done.
pub trait CopyEngine: Send + Sync + fmt::Debug {
    /// Copies each job's `src` into its `dst`.
    ///
    /// # Errors
    ///
    /// [`CopyError::LengthMismatch`] before copying anything if a job's
    /// lengths differ; [`CopyError::Failed`] if the engine fails.
    fn copy(&self, jobs: &mut [CopyJob<'_>]) -> Result<(), CopyError>;
}

/// Below this many bytes a batch is copied on the calling thread: starting
/// helper threads costs more than the copy (and on the project's VMs a
/// wake-up across vCPUs costs ~30 µs).
const PARALLEL_MIN: usize = 8 << 20;

/// The CPU engine: `memcpy`, on up to `threads` threads for large batches.
#[derive(Debug, Clone)]
pub struct CpuCopyEngine {
    threads: usize,
}

impl Default for CpuCopyEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuCopyEngine {
    /// An engine using as many threads as the process may run on.
    pub fn new() -> Self {
        Self::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// An engine using at most `threads` threads (at least one).
    pub fn with_threads(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// The most threads a batch is split across.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl CopyEngine for CpuCopyEngine {
    fn copy(&self, jobs: &mut [CopyJob<'_>]) -> Result<(), CopyError> {
        check_lengths(jobs)?;
        let total: usize = jobs.iter().map(|j| j.src.len()).sum();
        if self.threads == 1 || total < PARALLEL_MIN {
            for j in jobs.iter_mut() {
                j.dst.copy_from_slice(j.src);
            }
            return Ok(());
        }
        // Cut the batch into one share per thread, splitting jobs where a
        // share ends, then copy the shares at once.
        let per = total.div_ceil(self.threads);
        let mut shares: Vec<Vec<(&[u8], &mut [u8])>> = vec![Vec::new()];
        let mut room = per;
        for j in jobs.iter_mut() {
            let (mut src, mut dst): (&[u8], &mut [u8]) = (j.src, &mut *j.dst);
            while !src.is_empty() {
                if room == 0 {
                    shares.push(Vec::new());
                    room = per;
                }
                let n = room.min(src.len());
                let (s0, s1) = src.split_at(n);
                let (d0, d1) = std::mem::take(&mut dst).split_at_mut(n);
                if let Some(last) = shares.last_mut() {
                    last.push((s0, d0));
                }
                (src, dst) = (s1, d1);
                room -= n;
            }
        }
        let copy_share = |share: Vec<(&[u8], &mut [u8])>| {
            for (s, d) in share {
                d.copy_from_slice(s);
            }
        };
        std::thread::scope(|scope| {
            let mut shares = shares.into_iter();
            let mine = shares.next();
            for share in shares {
                scope.spawn(move || copy_share(share));
            }
            if let Some(share) = mine {
                copy_share(share);
            }
        });
        Ok(())
    }
}

fn check_lengths(jobs: &[CopyJob<'_>]) -> Result<(), CopyError> {
    match jobs
        .iter()
        .enumerate()
        .find(|(_, j)| j.src.len() != j.dst.len())
    {
        Some((index, j)) => Err(CopyError::LengthMismatch {
            index,
            src: j.src.len(),
            dst: j.dst.len(),
        }),
        None => Ok(()),
    }
}

/// Wraps an engine and makes chosen calls fail (dmirror-style fault
/// injection for copies): a failing call copies only its first half of the
/// jobs, then reports [`CopyError::Failed`], as a DMA error part-way would.
#[derive(Debug)]
pub struct FailingEngine<E> {
    inner: E,
    /// Calls left before the next failure; `u64::MAX` for none.
    countdown: AtomicU64,
    failures: AtomicU64,
}

impl<E: CopyEngine> FailingEngine<E> {
    /// Wraps `inner`; no failure is armed.
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            countdown: AtomicU64::new(u64::MAX),
            failures: AtomicU64::new(0),
        }
    }

    /// Makes the call after the next `n` succeed fail (0: the next call),
    /// once.
    pub fn fail_after(&self, n: u64) {
        self.countdown.store(n, Ordering::SeqCst);
    }

    /// How many calls have been failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }
}

impl<E: CopyEngine> CopyEngine for FailingEngine<E> {
    fn copy(&self, jobs: &mut [CopyJob<'_>]) -> Result<(), CopyError> {
        check_lengths(jobs)?;
        let fail = self
            .countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| match c {
                u64::MAX => None,
                0 => Some(u64::MAX),
                c => Some(c - 1),
            })
            == Ok(0);
        if !fail {
            return self.inner.copy(jobs);
        }
        self.failures.fetch_add(1, Ordering::SeqCst);
        let half = jobs.len() / 2;
        self.inner.copy(&mut jobs[..half])?;
        Err(CopyError::Failed {
            reason: "injected failure".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    #[test]
    fn batches_of_every_shape_copy_exactly() {
        // Small (one thread), and large enough to be split across threads
        // with jobs cut at share boundaries.
        for (threads, sizes) in [
            (1, vec![4096, 1, 8192]),
            (4, vec![3 << 20, 5 << 20, 4096, 7 << 20]),
            (3, vec![16 << 20]),
        ] {
            let srcs: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| pattern(n, i as u8))
                .collect();
            let mut dsts: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
            let mut jobs: Vec<CopyJob<'_>> = srcs
                .iter()
                .zip(dsts.iter_mut())
                .map(|(s, d)| CopyJob { src: s, dst: d })
                .collect();
            CpuCopyEngine::with_threads(threads)
                .copy(&mut jobs)
                .unwrap();
            assert!(srcs == dsts, "threads {threads}, sizes {sizes:?}");
        }
    }

    #[test]
    fn mismatched_lengths_copy_nothing() {
        let src = [1u8; 8];
        let (mut a, mut b) = ([0u8; 8], [0u8; 4]);
        let e = CpuCopyEngine::new()
            .copy(&mut [
                CopyJob {
                    src: &src,
                    dst: &mut a,
                },
                CopyJob {
                    src: &src,
                    dst: &mut b,
                },
            ])
            .unwrap_err();
        assert_eq!(
            e,
            CopyError::LengthMismatch {
                index: 1,
                src: 8,
                dst: 4
            }
        );
        assert_eq!(a, [0; 8]);
    }

    #[test]
    fn injected_failures_fail_the_chosen_call_once() {
        let engine = FailingEngine::new(CpuCopyEngine::with_threads(1));
        let src = [9u8; 4];
        let mut dsts = [[0u8; 4]; 4];
        let run = |dsts: &mut [[u8; 4]; 4]| {
            let mut jobs: Vec<CopyJob<'_>> = dsts
                .iter_mut()
                .map(|d| CopyJob { src: &src, dst: d })
                .collect();
            engine.copy(&mut jobs)
        };
        run(&mut dsts).unwrap();
        engine.fail_after(1);
        dsts = [[0; 4]; 4];
        run(&mut dsts).unwrap();
        dsts = [[0; 4]; 4];
        assert!(matches!(run(&mut dsts), Err(CopyError::Failed { .. })));
        assert_eq!(dsts, [[9; 4], [9; 4], [0; 4], [0; 4]], "half was copied");
        run(&mut dsts).unwrap();
        assert_eq!(engine.failures(), 1);
    }
}
