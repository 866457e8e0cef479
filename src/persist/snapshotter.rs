//! Loading the data dir into the registry at start, and the task that writes the registry back
//! every `--snapshot-interval` when it changed, and once more when the server stops.
//!
//! Snapshots that keep failing (a full or read-only disk, a file-size limit) widen what a
//! restart would lose with every acknowledged step; after `--max-snapshot-failures` in a row
//! the server reports not ready, so that an orchestrator moves its clients, and ready again
//! after the next snapshot that succeeds.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::{PersistError, Store, write_if_changed};
use crate::jobs::Registry;
use crate::metrics::Metrics;
use crate::probes::Readiness;
use crate::shutdown::Shutdown;

pub struct Snapshotter {
    store: Arc<Store>,
    registry: Registry,
    metrics: Metrics,
    /// The bytes on disk, so that an unchanged state is not written again.
    last: Vec<u8>,
    /// What failing snapshots turn not ready, and after how many in a row.
    readiness: Option<(Readiness, u64)>,
    failures_in_a_row: u64,
}

impl Snapshotter {
    /// Opens (and locks) the data dir `dir` and puts its jobs into `registry`, then returns the
    /// snapshotter that keeps the dir up to date. Runs on the blocking pool: reading and
    /// decoding a large state is file I/O and CPU. `max_jobs` is only reported: every job
    /// loaded is kept.
    pub async fn load(
        dir: &Path,
        discard_corrupt: bool,
        max_jobs: u64,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Result<Self, PersistError> {
        let owned_dir = dir.to_owned();
        let (store, loaded) =
            tokio::task::spawn_blocking(move || Store::open(&owned_dir, discard_corrupt))
                .await
                .map_err(|error| PersistError::Read {
                    path: dir.to_owned(),
                    source: std::io::Error::other(format!("loading task failed: {error}")),
                })??;
        if let Some((aside, reason)) = &loaded.set_aside {
            tracing::warn!(
                path = %aside.display(),
                %reason,
                "the state file failed its checks: moved aside, starting with no jobs"
            );
        }
        let count = loaded.jobs.len();
        for job in loaded.jobs {
            let id = job.id.clone();
            registry
                .insert_snapshot(job)
                .map_err(|error| PersistError::Restore {
                    path: store.state_path().display().to_string(),
                    reason: format!("job {id:?}: {error}"),
                })?;
        }
        tracing::info!(jobs = count, path = %store.state_path().display(), "state loaded");
        if count as u64 > max_jobs {
            tracing::warn!(
                jobs = count,
                max_jobs,
                "more jobs were loaded than --max-jobs allows: all are kept, CreateJob is \
                 refused until some are deleted"
            );
        }
        Ok(Self::new(
            store,
            registry.clone(),
            metrics.clone(),
            loaded.bytes,
        ))
    }

    /// `on_disk` is what the store loaded at start.
    fn new(store: Store, registry: Registry, metrics: Metrics, on_disk: Vec<u8>) -> Self {
        Self {
            store: Arc::new(store),
            registry,
            metrics,
            last: on_disk,
            readiness: None,
            failures_in_a_row: 0,
        }
    }

    /// After `max_failures` failed snapshots in a row, `readiness` reports not ready until
    /// one succeeds.
    pub fn with_readiness(mut self, readiness: Readiness, max_failures: u32) -> Self {
        self.readiness = Some((readiness, u64::from(max_failures.max(1))));
        self
    }

    /// Counts a periodic snapshot's outcome toward the not-ready threshold.
    fn record(&mut self, result: &Result<bool, PersistError>) {
        let Some((readiness, max_failures)) = &self.readiness else {
            return;
        };
        match result {
            Ok(_) => {
                if self.failures_in_a_row >= *max_failures {
                    tracing::warn!(
                        failed = self.failures_in_a_row,
                        "a snapshot succeeded again: ready"
                    );
                }
                self.failures_in_a_row = 0;
                readiness.set_snapshot_failure(None);
            }
            Err(error) => {
                self.failures_in_a_row += 1;
                if self.failures_in_a_row >= *max_failures {
                    let why = format!(
                        "the last {} snapshots failed (--max-snapshot-failures {}); the latest: \
                         {error}",
                        self.failures_in_a_row, max_failures
                    );
                    if self.failures_in_a_row == *max_failures {
                        tracing::error!(
                            "{why}. Reporting NOT READY (/readyz 503, Harmonizer health NOT_SERVING) \
                             until a snapshot succeeds: steps acknowledged since the last \
                             snapshot would be lost by a restart"
                        );
                    }
                    readiness.set_snapshot_failure(Some(why));
                }
            }
        }
        self.metrics
            .snapshot_failures_in_a_row(self.failures_in_a_row);
    }

    /// Writes the state if it changed; `Ok(true)` if it wrote. The work runs on the blocking
    /// pool: encoding 100,000 jobs and an fsync must not stall the runtime's threads.
    pub async fn snapshot(&mut self) -> Result<bool, PersistError> {
        let store = Arc::clone(&self.store);
        let registry = self.registry.clone();
        let mut last = std::mem::take(&mut self.last);
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let jobs = registry.snapshots();
            let result = write_if_changed(&store, &jobs, &mut last);
            (result, last)
        })
        .await;
        let (result, last) = match joined {
            Ok(done) => done,
            Err(error) => {
                // The bytes on disk are unknown now; an empty `last` makes the next snapshot
                // write whatever the state is.
                self.metrics.snapshot_failed();
                return Err(PersistError::Write {
                    path: self.store.state_path().to_owned(),
                    source: std::io::Error::other(format!("snapshot task failed: {error}")),
                });
            }
        };
        self.last = last;
        match result {
            Ok(Some(timing)) => {
                let elapsed = started.elapsed();
                self.metrics.snapshot_written(elapsed, SystemTime::now());
                tracing::debug!(?elapsed, encode = ?timing.encode, write = ?timing.write, "snapshot written");
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(error) => {
                self.metrics.snapshot_failed();
                Err(error)
            }
        }
    }

    /// Snapshots every `interval` until `shutdown`, then returns itself for the final snapshot.
    /// A failed snapshot is logged and retried at the next tick; the previous state file stays
    /// in place meanwhile.
    pub async fn run(mut self, interval: Duration, mut shutdown: Shutdown) -> Self {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let result = self.snapshot().await;
                    if let Err(error) = &result {
                        tracing::error!(%error, "snapshot failed");
                    }
                    self.record(&result);
                }
                () = shutdown.recv() => return self,
            }
        }
    }
}
