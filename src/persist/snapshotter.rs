//! The task that writes the registry to the data dir every `--snapshot-interval` when it
//! changed, and once more when the server stops.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::{PersistError, Store, write_if_changed};
use crate::jobs::Registry;
use crate::metrics::Metrics;

pub struct Snapshotter {
    store: Arc<Store>,
    registry: Registry,
    metrics: Metrics,
    /// The bytes on disk, so that an unchanged state is not written again.
    last: Vec<u8>,
}

impl Snapshotter {
    /// `on_disk` is what the store loaded at start.
    pub fn new(store: Store, registry: Registry, metrics: Metrics, on_disk: Vec<u8>) -> Self {
        Self {
            store: Arc::new(store),
            registry,
            metrics,
            last: on_disk,
        }
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

    /// Snapshots every `interval` until `stop` turns true, then returns itself for the final
    /// snapshot. A failed snapshot is logged and retried at the next tick; the previous state
    /// file stays in place meanwhile.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) -> Self {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Err(error) = self.snapshot().await {
                        tracing::error!(%error, "snapshot failed");
                    }
                }
                () = async { let _ = stop.wait_for(|stop| *stop).await; } => return self,
            }
        }
    }
}
