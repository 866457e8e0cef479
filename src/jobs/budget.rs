//! What jobs may hold, so that the worst case fits the deployment's memory limit and one
//! caller's burst leaves the others served: the bytes of one job (`--max-job-bytes`), of every
//! job together (`--max-jobs-bytes`), and per caller its jobs and their bytes (a token's
//! `max_jobs` and `max_jobs_bytes`, or `--caller-max-jobs` and `--caller-max-jobs-bytes`).
//!
//! A job's bytes are an estimate, made to err high: its fixed part from its spec (bins, world
//! size, kept steps), calibrated against the resident memory of 4,096-bin jobs with a data dir
//! (the state file's copies included, see `BYTES_PER_BIN`), plus what its pending steps hold,
//! as the step barrier counts it. Counters are atomics: a check and its charge are not one step, so that two racing
//! creations may pass one limit by one job's bytes at most.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

/// What one caller may hold: jobs, and the bytes of its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub max_jobs: usize,
    pub max_jobs_bytes: usize,
}

/// Who creates a job: a token's name, or on an open server the peer's address, with the
/// quotas its token sets (`None`: the server's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub caller: String,
    pub max_jobs: Option<usize>,
    pub max_jobs_bytes: Option<usize>,
}

/// Per job, besides its bins: the job, its map entry, its lock and counters, its snapshot.
const JOB_OVERHEAD: usize = 1024;
/// Per bin, as measured: the resident memory of 16,126 jobs of 4,096 bins on a server with a
/// data dir was 95 KiB per job, 113 KiB at its peak (23 and 28 bytes per bin): the density and
/// the bin edges (4 bytes each), the snapshot task's copy of the last state file and, while it
/// writes, the snapshot and its encoding (4 bytes each), and what the allocator keeps of them
/// once freed. 32 leaves a margin above the peak.
const BYTES_PER_BIN: usize = 32;
/// Per kept step of a step-synchronous job: its table and density, plus the missing ranks of a
/// partial step (4 bytes per rank of the world).
const KEPT_STEP_OVERHEAD: usize = 128;

/// The fixed bytes of a job of this id, bins and world size (0 and 1: asynchronous).
pub(super) fn fixed_bytes(id: &str, bins: usize, world_size: u32, kept_steps: usize) -> usize {
    let mut bytes = JOB_OVERHEAD + 2 * id.len() + BYTES_PER_BIN * bins;
    if world_size > 1 {
        let kept = KEPT_STEP_OVERHEAD + 8 * bins + 4 * world_size as usize;
        bytes += kept_steps.saturating_mul(kept);
    }
    bytes
}

/// One caller's use.
pub(super) struct CallerAccount {
    name: String,
    jobs: AtomicUsize,
    bytes: AtomicUsize,
    /// The quota of the caller's latest request: a reloaded tokens file may change it.
    max_jobs: AtomicUsize,
    max_jobs_bytes: AtomicUsize,
}

impl CallerAccount {
    fn jobs(&self) -> usize {
        self.jobs.load(Ordering::SeqCst)
    }
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
    fn max_jobs(&self) -> usize {
        self.max_jobs.load(Ordering::SeqCst)
    }
    fn max_jobs_bytes(&self) -> usize {
        self.max_jobs_bytes.load(Ordering::SeqCst)
    }
}

/// The server-wide count, and every caller's.
pub(super) struct Budget {
    max_job_bytes: usize,
    max_jobs_bytes: usize,
    default_quota: Quota,
    total_bytes: AtomicUsize,
    callers: DashMap<String, Arc<CallerAccount>>,
}

/// Why a job cannot be created, or a step cannot hold more.
pub(super) struct Refusal(pub String);

impl Budget {
    pub(super) fn new(max_job_bytes: usize, max_jobs_bytes: usize, default_quota: Quota) -> Self {
        Self {
            max_job_bytes,
            max_jobs_bytes,
            default_quota,
            total_bytes: AtomicUsize::new(0),
            callers: DashMap::new(),
        }
    }

    pub(super) fn total_bytes(&self) -> usize {
        self.total_bytes.load(Ordering::SeqCst)
    }

    /// Charges a new job's fixed bytes to the server and to `owner`, or says which limit it
    /// would pass; nothing is charged then. Jobs from the data dir have no owner and are never
    /// refused (`enforce` false), as `--max-jobs` does not drop them either.
    pub(super) fn open(
        self: &Arc<Self>,
        owner: Option<&Owner>,
        bytes: usize,
        enforce: bool,
    ) -> Result<JobCharge, Refusal> {
        let account = owner.map(|owner| self.account(owner));
        if let Some(account) = &account {
            let (jobs, max_jobs) = (account.jobs(), account.max_jobs());
            if jobs >= max_jobs {
                return Err(Refusal(format!(
                    "caller {:?} holds {jobs} jobs, its quota (max_jobs {max_jobs}); delete \
                     jobs that are done",
                    account.name
                )));
            }
        }
        if enforce {
            self.check_growth(account.as_deref(), bytes, bytes)?;
        }
        self.total_bytes.fetch_add(bytes, Ordering::SeqCst);
        if let Some(account) = &account {
            account.jobs.fetch_add(1, Ordering::SeqCst);
            account.bytes.fetch_add(bytes, Ordering::SeqCst);
        }
        Ok(JobCharge {
            budget: Arc::clone(self),
            account,
            fixed: AtomicUsize::new(bytes),
            pending: AtomicUsize::new(0),
        })
    }

    /// Whether a job may grow by `extra` bytes to `job_bytes` (its fixed part): the job's own
    /// limit, its owner's quota, the server's.
    fn check_growth(
        &self,
        account: Option<&CallerAccount>,
        job_bytes: usize,
        extra: usize,
    ) -> Result<(), Refusal> {
        if job_bytes > self.max_job_bytes {
            return Err(Refusal(format!(
                "the job needs {job_bytes} bytes (its bins, world size and kept steps), above \
                 the {} one job may hold (--max-job-bytes)",
                self.max_job_bytes
            )));
        }
        if let Some(account) = account {
            let (used, max_bytes) = (account.bytes(), account.max_jobs_bytes());
            if used.saturating_add(extra) > max_bytes {
                return Err(Refusal(format!(
                    "caller {:?}'s jobs hold {used} bytes; this one needs {extra} more, past \
                     its quota (max_jobs_bytes {max_bytes})",
                    account.name
                )));
            }
        }
        let total = self.total_bytes();
        if total.saturating_add(extra) > self.max_jobs_bytes {
            return Err(Refusal(format!(
                "the server's jobs hold {total} bytes; this one needs {extra} more, past the \
                 limit (--max-jobs-bytes {})",
                self.max_jobs_bytes
            )));
        }
        Ok(())
    }

    /// The caller's account, with the quota its latest request carries.
    fn account(&self, owner: &Owner) -> Arc<CallerAccount> {
        let max_jobs = owner.max_jobs.unwrap_or(self.default_quota.max_jobs);
        let max_jobs_bytes = owner
            .max_jobs_bytes
            .unwrap_or(self.default_quota.max_jobs_bytes);
        let account = Arc::clone(
            &self.callers.entry(owner.caller.clone()).or_insert_with(|| {
                Arc::new(CallerAccount {
                    name: owner.caller.clone(),
                    jobs: AtomicUsize::new(0),
                    bytes: AtomicUsize::new(0),
                    max_jobs: AtomicUsize::new(max_jobs),
                    max_jobs_bytes: AtomicUsize::new(max_jobs_bytes),
                })
            }),
        );
        account.max_jobs.store(max_jobs, Ordering::SeqCst);
        account
            .max_jobs_bytes
            .store(max_jobs_bytes, Ordering::SeqCst);
        account
    }
}

/// What one job is charged: released when the job is dropped.
pub(super) struct JobCharge {
    budget: Arc<Budget>,
    account: Option<Arc<CallerAccount>>,
    /// Its spec's part: it changes when UpdateJob grows the world.
    fixed: AtomicUsize,
    pending: AtomicUsize,
}

/// The most a job's pending steps may hold, and which limit decides it.
pub(super) struct PendingLimit {
    pub bytes: usize,
    pub decided_by: String,
}

impl JobCharge {
    /// What the job's pending steps may hold at most now, by the tightest of the job's own
    /// limit, the server's and its owner's.
    pub(super) fn pending_limit(&self) -> PendingLimit {
        let budget = &self.budget;
        let pending = self.pending.load(Ordering::SeqCst);
        let mut limit = PendingLimit {
            bytes: budget.max_job_bytes.saturating_sub(self.fixed()),
            decided_by: format!("--max-job-bytes {}", budget.max_job_bytes),
        };
        let server_left = budget
            .max_jobs_bytes
            .saturating_sub(budget.total_bytes())
            .saturating_add(pending);
        if server_left < limit.bytes {
            limit = PendingLimit {
                bytes: server_left,
                decided_by: format!(
                    "--max-jobs-bytes {}, of which the server's jobs use {}",
                    budget.max_jobs_bytes,
                    budget.total_bytes()
                ),
            };
        }
        if let Some(account) = &self.account {
            let (used, max_bytes) = (account.bytes(), account.max_jobs_bytes());
            let caller_left = max_bytes.saturating_sub(used).saturating_add(pending);
            if caller_left < limit.bytes {
                limit = PendingLimit {
                    bytes: caller_left,
                    decided_by: format!(
                        "caller {:?}'s quota max_jobs_bytes {max_bytes}, of which its jobs use \
                         {used}",
                        account.name
                    ),
                };
            }
        }
        limit
    }

    /// Records what the job's pending steps hold now.
    pub(super) fn set_pending(&self, bytes: usize) {
        let before = self.pending.swap(bytes, Ordering::SeqCst);
        self.adjust(before, bytes);
    }

    fn adjust(&self, before: usize, after: usize) {
        let counters = std::iter::once(&self.budget.total_bytes)
            .chain(self.account.as_deref().map(|account| &account.bytes));
        for counter in counters {
            if after >= before {
                counter.fetch_add(after - before, Ordering::SeqCst);
            } else {
                counter.fetch_sub(before - after, Ordering::SeqCst);
            }
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.fixed() + self.pending.load(Ordering::SeqCst)
    }

    pub(super) fn fixed(&self) -> usize {
        self.fixed.load(Ordering::SeqCst)
    }

    /// Makes the job's fixed part `bytes` (UpdateJob changed its world size), or says which
    /// limit a growth would pass; nothing changes then.
    pub(super) fn set_fixed(&self, bytes: usize) -> Result<(), Refusal> {
        let before = self.fixed();
        if bytes > before {
            self.budget
                .check_growth(self.account.as_deref(), bytes, bytes - before)?;
        }
        self.fixed.store(bytes, Ordering::SeqCst);
        self.adjust(before, bytes);
        Ok(())
    }
}

impl Drop for JobCharge {
    fn drop(&mut self) {
        let held = *self.fixed.get_mut() + *self.pending.get_mut();
        self.adjust(held, 0);
        if let Some(account) = &self.account {
            account.jobs.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
