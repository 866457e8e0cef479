//! Durable state: every job's spec and density in one file under `--data-dir`, replaced
//! atomically, so that a restart (planned or a crash) loses at most the last
//! `--snapshot-interval` of steps, and a planned one loses none.
//!
//! One file for all jobs rather than one per job: 100,000 small files would cost more in
//! metadata operations than the bytes themselves, and a single rename makes the whole state
//! change at once.

mod format;
mod snapshotter;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub use format::{FormatError, HEADER_LEN, MAGIC, VERSION, decode, encode};
pub use snapshotter::Snapshotter;

use crate::jobs::JobSnapshot;

/// The state file inside the data dir.
pub const STATE_FILE: &str = "state.ghmd";
/// Where a snapshot is written before it is renamed over [`STATE_FILE`].
pub const TEMP_FILE: &str = "state.ghmd.tmp";
/// Held locked while a ghmd uses the dir, so that two servers never write one state.
pub const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot create the data dir {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("the data dir {} is in use by another ghmd (it holds {})", dir.display(), lock.display())]
    InUse { dir: PathBuf, lock: PathBuf },
    #[error("cannot read the state file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the state file {} cannot be loaded: {source}. It is left as it is; move it away, or \
         start with --discard-corrupt-state to have ghmd rename it and start empty",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("cannot move the corrupt state file {} to {}: {source}", from.display(), to.display())]
    SetAside {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot write the state file {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("the state file {path} holds a job that cannot be restored: {reason}")]
    Restore { path: String, reason: String },
}

/// What opening the data dir found.
#[derive(Debug)]
pub struct Loaded {
    pub jobs: Vec<JobSnapshot>,
    /// Where a corrupt state file was moved, with why it was refused (`--discard-corrupt-state`).
    pub set_aside: Option<(PathBuf, FormatError)>,
    /// The encoded bytes of what was loaded, so that an unchanged state is not rewritten.
    pub bytes: Vec<u8>,
}

/// A locked data dir.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    state: PathBuf,
    temp: PathBuf,
    /// Held for the store's lifetime: the OS releases the lock when the file is closed, even
    /// on kill -9.
    _lock: File,
}

impl Store {
    /// Creates and locks the dir, and loads its state. A state file that fails its checks is
    /// never touched unless `discard_corrupt` says to rename it aside.
    pub fn open(dir: &Path, discard_corrupt: bool) -> Result<(Self, Loaded), PersistError> {
        fs::create_dir_all(dir).map_err(|source| PersistError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        ignore_file_size_signal();
        let lock_path = dir.join(LOCK_FILE);
        let lock = open_regular(
            &lock_path,
            OpenOptions::new().create(true).truncate(false).write(true),
        )
        .map_err(|source| PersistError::Lock {
            path: lock_path.clone(),
            source,
        })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(PersistError::InUse {
                    dir: dir.to_owned(),
                    lock: lock_path,
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(PersistError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        let store = Self {
            dir: dir.to_owned(),
            state: dir.join(STATE_FILE),
            temp: dir.join(TEMP_FILE),
            _lock: lock,
        };
        // A temp file is a write that never reached its rename: the state file is still the
        // last complete snapshot, so the leftover is only garbage.
        match fs::remove_file(&store.temp) {
            Ok(()) => {
                tracing::warn!(path = %store.temp.display(), "removed an unfinished snapshot")
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PersistError::Write {
                    path: store.temp.clone(),
                    source,
                });
            }
        }
        let loaded = store.load(discard_corrupt)?;
        Ok((store, loaded))
    }

    pub fn state_path(&self) -> &Path {
        &self.state
    }

    fn load(&self, discard_corrupt: bool) -> Result<Loaded, PersistError> {
        let bytes = match read_regular(&self.state) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    jobs: Vec::new(),
                    set_aside: None,
                    bytes: encode(&[]),
                });
            }
            Err(source) => {
                return Err(PersistError::Read {
                    path: self.state.clone(),
                    source,
                });
            }
        };
        match decode(&bytes) {
            Ok(jobs) => Ok(Loaded {
                jobs,
                set_aside: None,
                bytes,
            }),
            Err(source) if discard_corrupt => {
                let aside = self.set_aside()?;
                Ok(Loaded {
                    jobs: Vec::new(),
                    set_aside: Some((aside, source)),
                    bytes: encode(&[]),
                })
            }
            Err(source) => Err(PersistError::Corrupt {
                path: self.state.clone(),
                source,
            }),
        }
    }

    /// Renames the state file to `state.ghmd.corrupt-<unix seconds>[-n]`, a name no later
    /// start reads and no later snapshot overwrites.
    fn set_aside(&self) -> Result<PathBuf, PersistError> {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}-{n}"));
            n += 1;
        }
        fs::rename(&self.state, &aside)
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|source| PersistError::SetAside {
                from: self.state.clone(),
                to: aside.clone(),
                source,
            })?;
        Ok(aside)
    }

    /// Replaces the state file with `bytes` so that a crash at any point leaves either the old
    /// file or the new one: write a temp file, fsync it, rename it over the state file, fsync
    /// the dir so that the rename itself is durable.
    pub fn write(&self, bytes: &[u8]) -> Result<(), PersistError> {
        let wrap = |path: &Path| {
            let path = path.to_owned();
            move |source| PersistError::Write { path, source }
        };
        let mut file = open_regular(
            &self.temp,
            OpenOptions::new().create(true).truncate(true).write(true),
        )
        .map_err(wrap(&self.temp))?;
        file.write_all(bytes).map_err(wrap(&self.temp))?;
        file.sync_all().map_err(wrap(&self.temp))?;
        drop(file);
        fs::rename(&self.temp, &self.state).map_err(wrap(&self.state))?;
        sync_dir(&self.dir).map_err(wrap(&self.dir))
    }
}

/// Opens `path` only if it is a regular file, and never blocks: a FIFO (or a device) at the
/// state, temp or lock path would otherwise hang the start, or the snapshot task, without a
/// word.
fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    match fs::metadata(path) {
        Ok(metadata) => refuse_unless_regular(&metadata)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    // Checked again on what was opened, in case the path changed in between.
    refuse_unless_regular(&file.metadata()?)?;
    Ok(file)
}

fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path, OpenOptions::new().read(true))?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn refuse_unless_regular(metadata: &fs::Metadata) -> io::Result<()> {
    let kind = metadata.file_type();
    if kind.is_file() {
        return Ok(());
    }
    let what = if kind.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device"
            } else {
                "not a file"
            }
        }
        #[cfg(not(unix))]
        "not a file"
    };
    Err(io::Error::other(format!(
        "it is {what}, not a regular file; remove it or choose another --data-dir"
    )))
}

/// A write past RLIMIT_FSIZE (`ulimit -f`) sends SIGXFSZ, whose default action kills the
/// process with every unsaved step; ignored, the write fails with EFBIG instead, which the
/// snapshot task reports and counts like any other write error.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler and touches no
    // memory; the only signal concerned is one ghmd never handles elsewhere.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads and checks a state file without locking its dir (for tests and tools).
pub fn read_file(path: &Path) -> Result<Vec<JobSnapshot>, PersistError> {
    let bytes = fs::read(path).map_err(|source| PersistError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(&bytes).map_err(|source| PersistError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

/// How long encoding and writing one snapshot took, for the README's figure and the metrics.
#[derive(Clone, Copy, Debug)]
pub struct WriteTiming {
    pub encode: Duration,
    pub write: Duration,
}

/// Encodes `jobs` and writes them unless the bytes equal `last`; returns the timing when it
/// wrote. Comparing bytes rather than counting changes means a snapshot is skipped exactly
/// when it would write what is already on disk.
pub fn write_if_changed(
    store: &Store,
    jobs: &[JobSnapshot],
    last: &mut Vec<u8>,
) -> Result<Option<WriteTiming>, PersistError> {
    let started = Instant::now();
    let bytes = encode(jobs);
    let encoded = Instant::now();
    if bytes == *last {
        return Ok(None);
    }
    store.write(&bytes)?;
    let timing = WriteTiming {
        encode: encoded - started,
        write: encoded.elapsed(),
    };
    *last = bytes;
    Ok(Some(timing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ghm::{Density, Loss, Spec};
    use crate::jobs::JobSpec;
    use crate::method::{AnyState, Ghm, MethodSpec};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ghmd-persist-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn snapshot(id: &str) -> JobSnapshot {
        let now = SystemTime::now();
        JobSnapshot {
            id: id.to_owned(),
            spec: JobSpec {
                method: MethodSpec::Ghm(Ghm {
                    spec: Spec::new(Loss::GhmC, 4, 0.75, 0.0).expect("spec"),
                }),
                world_size: 0,
                step_timeout: Duration::from_secs(30),
                allow_partial_steps: false,
            },
            state: AnyState::Ghm(Density::from_acc_sum(vec![0.5, 1.25, 0.0, 3.0])),
            steps: 2,
            elements: 17,
            next_step: 0,
            world_size_schedule: Vec::new(),
            generation: 1,
            run_id: String::new(),
            create_time: now,
            update_time: now,
        }
    }

    #[test]
    fn a_written_state_is_loaded_by_the_next_open() {
        let dir = temp_dir("roundtrip");
        let (store, loaded) = Store::open(&dir, false).expect("open");
        assert!(loaded.jobs.is_empty());
        let jobs = vec![snapshot("a"), snapshot("b")];
        let mut last = loaded.bytes;
        assert!(
            write_if_changed(&store, &jobs, &mut last)
                .expect("write")
                .is_some()
        );
        assert!(
            write_if_changed(&store, &jobs, &mut last)
                .expect("write")
                .is_none()
        );
        assert!(!dir.join(TEMP_FILE).exists());
        drop(store);
        let (_store, loaded) = Store::open(&dir, false).expect("reopen");
        assert_eq!(loaded.jobs, jobs);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_second_server_on_the_same_dir_is_refused() {
        let dir = temp_dir("lock");
        let (_store, _) = Store::open(&dir, false).expect("open");
        let error = Store::open(&dir, false).expect_err("second open");
        assert!(matches!(error, PersistError::InUse { .. }), "{error}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_corrupt_file_is_refused_and_left_alone_unless_discarded() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).expect("dir");
        let mut bytes = encode(&[snapshot("a")]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(dir.join(STATE_FILE), &bytes).expect("write");

        let error = Store::open(&dir, false).expect_err("refused");
        let message = error.to_string();
        assert!(
            message.contains(&dir.join(STATE_FILE).display().to_string()),
            "{message}"
        );
        assert!(message.contains("checksum mismatch"), "{message}");
        assert_eq!(fs::read(dir.join(STATE_FILE)).expect("still there"), bytes);

        let (_store, loaded) = Store::open(&dir, true).expect("discarded");
        assert!(loaded.jobs.is_empty());
        let (aside, reason) = loaded.set_aside.expect("set aside");
        assert!(matches!(reason, FormatError::Checksum { .. }));
        assert_eq!(fs::read(&aside).expect("kept"), bytes);
        assert!(!dir.join(STATE_FILE).exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_leftover_temp_file_is_removed_and_the_state_kept() {
        let dir = temp_dir("temp");
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join(STATE_FILE), encode(&[snapshot("kept")])).expect("state");
        fs::write(dir.join(TEMP_FILE), b"half a snapsh").expect("temp");
        let (_store, loaded) = Store::open(&dir, false).expect("open");
        assert_eq!(loaded.jobs.len(), 1);
        assert_eq!(loaded.jobs[0].id, "kept");
        assert!(!dir.join(TEMP_FILE).exists());
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
