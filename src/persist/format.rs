//! The state file's bytes: a fixed header, then every job.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "GHMDSNAP"
//!      8     4  format version, u32 little-endian (this code writes VERSION, and reads
//!               every version from FIRST_VERSION on)
//!     12     4  CRC-32 (IEEE) of the payload, u32 little-endian
//!     16     8  payload length in bytes, u64 little-endian
//!     24     …  payload: a u64 job count, then each job as `encode_job` writes it
//! ```
//!
//! Version 2 appends each job's lineage to the end of its record: its generation (u64) and its
//! run id (u32 length, then UTF-8). A version 1 file (written before lineages existed) loads
//! with generation 1 and no run id, so that an upgrade keeps every job.
//!
//! Version 3 adds Seesaw and EQLv2 jobs. A job's record starts with its id and a method byte;
//! GHM's record (bytes 0 and 1, GHM-C and GHM-R) is version 2's byte for byte. For the other
//! methods the bytes from the spec's parameters to the state differ, and the rest is the same:
//!
//! ```text
//! byte  method   spec parameters               state (each array: u32 length, f32 bits)
//!    0  GHM-C    bins u32, momentum, mu (f64)   acc_sum
//!    1  GHM-R    bins u32, momentum, mu (f64)   acc_sum
//!    2  Seesaw   num_classes u32, p, q, eps     cum_samples
//!    3  EQLv2    num_classes u32, gamma, mu,    pos_grad, neg_grad, pos_neg
//!                alpha
//! ```
//!
//! with world_size, step_timeout and allow_partial_steps between the parameters and the state,
//! as in version 2. Versions 1 and 2 hold method bytes 0 and 1 only.
//!
//! Every number is little-endian and every float is stored by its bits, so a job comes back
//! bit for bit. The header is checked before anything is decoded: a file that is not ours,
//! of another version, truncated or altered is refused with the reason, never half-loaded.

use std::time::{Duration, SystemTime};

use crate::jobs::{JobSnapshot, JobSpec, WorldSizeChange};
use crate::method::{MethodRecord, MethodSpec};

pub const MAGIC: &[u8; 8] = b"GHMDSNAP";
pub const VERSION: u32 = 3;
/// The oldest format this code still reads.
pub const FIRST_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;

/// Why a state file's bytes cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("not a ghmd state file (it does not start with {MAGIC:?})")]
    Magic,
    #[error("truncated: {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    ShortHeader { len: usize },
    #[error("format version {found}; this ghmd reads versions {FIRST_VERSION} to {VERSION}")]
    Version { found: u32 },
    #[error("truncated: the header promises {expected} payload bytes, the file holds {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("{extra} bytes after the {expected}-byte payload the header promises")]
    TrailingBytes { expected: u64, extra: u64 },
    #[error(
        "checksum mismatch: the header says {expected:#010x}, the payload hashes to {found:#010x}"
    )]
    Checksum { expected: u32, found: u32 },
    #[error("job #{index}: {reason}")]
    Job { index: u64, reason: String },
    #[error("the payload ends inside job #{index}")]
    PayloadEnds { index: u64 },
    #[error("{extra} bytes after the last job")]
    PayloadTrailing { extra: usize },
}

/// The whole file for `jobs`.
pub fn encode(jobs: &[JobSnapshot]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(8 + jobs.len() * 128);
    put_u64(&mut payload, jobs.len() as u64);
    for job in jobs {
        encode_job(&mut payload, job);
    }
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(MAGIC);
    put_u32(&mut file, VERSION);
    put_u32(&mut file, crc32fast::hash(&payload));
    put_u64(&mut file, payload.len() as u64);
    file.extend_from_slice(&payload);
    file
}

/// Checks the header, the length and the checksum, then decodes every job.
pub fn decode(bytes: &[u8]) -> Result<Vec<JobSnapshot>, FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        // A file cut inside the magic is still most likely ours, cut short.
        return Err(if MAGIC.starts_with(bytes) {
            FormatError::ShortHeader { len: bytes.len() }
        } else {
            FormatError::Magic
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::ShortHeader { len: bytes.len() });
    }
    let mut header = Reader::new(&bytes[MAGIC.len()..HEADER_LEN]);
    let (Some(version), Some(checksum), Some(expected)) =
        (header.u32(), header.u32(), header.u64())
    else {
        return Err(FormatError::ShortHeader { len: bytes.len() });
    };
    if !(FIRST_VERSION..=VERSION).contains(&version) {
        return Err(FormatError::Version { found: version });
    }
    let payload = &bytes[HEADER_LEN..];
    let found = payload.len() as u64;
    if found < expected {
        return Err(FormatError::Truncated { expected, found });
    }
    if found > expected {
        return Err(FormatError::TrailingBytes {
            expected,
            extra: found - expected,
        });
    }
    let hashed = crc32fast::hash(payload);
    if hashed != checksum {
        return Err(FormatError::Checksum {
            expected: checksum,
            found: hashed,
        });
    }

    let mut reader = Reader::new(payload);
    let count = reader.u64().ok_or(FormatError::PayloadEnds { index: 0 })?;
    // Every job takes well over 8 bytes, so the count cannot honestly exceed this; checked
    // before reserving memory for it.
    let capacity = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(payload.len() / 8);
    let mut jobs = Vec::with_capacity(capacity);
    for index in 0..count {
        jobs.push(decode_job(&mut reader, index, version)?);
    }
    if reader.remaining() > 0 {
        return Err(FormatError::PayloadTrailing {
            extra: reader.remaining(),
        });
    }
    Ok(jobs)
}

// One job. `encode_job` destructures the snapshot and the spec without `..` and `decode_job`
// builds them field by field, so a field added to either fails to compile here until the
// file format carries it (and VERSION says so).

fn encode_job(out: &mut Vec<u8>, job: &JobSnapshot) {
    let JobSnapshot {
        id,
        spec,
        state,
        steps,
        elements,
        next_step,
        world_size_schedule,
        generation,
        run_id,
        create_time,
        update_time,
    } = job;
    let JobSpec {
        method,
        world_size,
        step_timeout,
        allow_partial_steps,
    } = spec;
    put_bytes(out, id.as_bytes());
    let MethodRecord {
        code,
        size,
        parameters,
    } = method.record();
    out.push(code);
    put_u32(out, size);
    for parameter in parameters {
        put_u64(out, parameter.to_bits());
    }
    put_u32(out, *world_size);
    put_duration(out, *step_timeout);
    out.push(u8::from(*allow_partial_steps));
    for array in state.arrays() {
        put_f32s(out, array);
    }
    put_u64(out, *steps);
    put_u64(out, *elements);
    put_u64(out, *next_step);
    put_u32(out, world_size_schedule.len() as u32);
    for WorldSizeChange {
        from_step,
        world_size,
    } in world_size_schedule
    {
        put_u64(out, *from_step);
        put_u32(out, *world_size);
    }
    put_time(out, *create_time);
    put_time(out, *update_time);
    put_u64(out, *generation);
    put_bytes(out, run_id.as_bytes());
}

fn decode_job(
    reader: &mut Reader<'_>,
    index: u64,
    version: u32,
) -> Result<JobSnapshot, FormatError> {
    let ends = || FormatError::PayloadEnds { index };
    let bad = |reason: String| FormatError::Job { index, reason };

    let id = String::from_utf8(reader.bytes().ok_or_else(ends)?.to_vec())
        .map_err(|_| bad("the job id is not UTF-8".into()))?;
    let bad = |reason: String| FormatError::Job {
        index,
        reason: format!("job {id:?}: {reason}"),
    };
    let code = reader.u8().ok_or_else(ends)?;
    let known = MethodSpec::record_parameters(code).filter(|_| version >= 3 || code < 2);
    let Some(parameters) = known else {
        return Err(bad(format!("unknown method code {code}")));
    };
    let size = reader.u32().ok_or_else(ends)?;
    let parameters = (0..parameters)
        .map(|_| reader.u64().map(f64::from_bits).ok_or_else(ends))
        .collect::<Result<_, _>>()?;
    let method = MethodSpec::from_record(&MethodRecord {
        code,
        size,
        parameters,
    })
    .map_err(bad)?;
    let world_size = reader.u32().ok_or_else(ends)?;
    let step_timeout = reader.duration().ok_or_else(ends)?;
    let allow_partial_steps = match reader.u8().ok_or_else(ends)? {
        0 => false,
        1 => true,
        other => return Err(bad(format!("allow_partial_steps byte {other}"))),
    };
    let arrays = (0..method.state_arrays())
        .map(|_| reader.f32s().ok_or_else(ends))
        .collect::<Result<_, _>>()?;
    let state = method
        .state_from_arrays(arrays)
        .map_err(|e| bad(e.to_string()))?;
    let steps = reader.u64().ok_or_else(ends)?;
    let elements = reader.u64().ok_or_else(ends)?;
    let next_step = reader.u64().ok_or_else(ends)?;
    let changes = reader.u32().ok_or_else(ends)? as usize;
    if changes > reader.remaining() / 12 {
        return Err(ends());
    }
    let mut world_size_schedule = Vec::with_capacity(changes);
    for _ in 0..changes {
        world_size_schedule.push(WorldSizeChange {
            from_step: reader.u64().ok_or_else(ends)?,
            world_size: reader.u32().ok_or_else(ends)?,
        });
    }
    let create_time = reader.time().ok_or_else(ends)?;
    let update_time = reader.time().ok_or_else(ends)?;
    let (generation, run_id) = if version >= 2 {
        let generation = reader.u64().ok_or_else(ends)?;
        if generation == 0 {
            return Err(bad("generation 0: a job's generation starts at 1".into()));
        }
        let run_id = String::from_utf8(reader.bytes().ok_or_else(ends)?.to_vec())
            .map_err(|_| bad("the run id is not UTF-8".into()))?;
        (generation, run_id)
    } else {
        (1, String::new())
    };
    Ok(JobSnapshot {
        id,
        spec: JobSpec {
            method,
            world_size,
            step_timeout,
            allow_partial_steps,
        },
        state,
        steps,
        elements,
        next_step,
        world_size_schedule,
        generation,
        run_id,
        create_time,
        update_time,
    })
}

fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    put_u32(out, values.len() as u32);
    for value in values {
        put_u32(out, value.to_bits());
    }
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn put_duration(out: &mut Vec<u8>, duration: Duration) {
    put_u64(out, duration.as_secs());
    put_u32(out, duration.subsec_nanos());
}

/// Signed seconds and nanoseconds from the Unix epoch, so that any `SystemTime` comes back as
/// it was.
fn put_time(out: &mut Vec<u8>, time: SystemTime) {
    let (negative, offset) = match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => (false, after),
        Err(before) => (true, before.duration()),
    };
    out.push(u8::from(negative));
    put_duration(out, offset);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    /// A u32 length, then that many floats by their bits; a length past the bytes left is a
    /// truncated file, refused before any memory is reserved for it.
    fn f32s(&mut self) -> Option<Vec<f32>> {
        let len = self.u32()? as usize;
        let bytes = self.take(len.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|chunk| {
                    f32::from_bits(u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                })
                .collect(),
        )
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn duration(&mut self) -> Option<Duration> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        (nanos < 1_000_000_000).then(|| Duration::new(secs, nanos))
    }

    fn time(&mut self) -> Option<SystemTime> {
        let negative = self.u8()?;
        let offset = self.duration()?;
        match negative {
            0 => SystemTime::UNIX_EPOCH.checked_add(offset),
            1 => SystemTime::UNIX_EPOCH.checked_sub(offset),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eqlv2::Eqlv2;
    use crate::ghm::{self, Density, Loss};
    use crate::method::{AnyState, Ghm};
    use crate::seesaw::Seesaw;

    fn values(len: u32, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| f32::from_bits(0x3f00_0000 ^ (i.wrapping_mul(2_654_435_761) ^ seed) >> 9))
            .collect()
    }

    fn job(id: &str, loss: Loss, bins: u32, momentum: f64, seed: u32) -> JobSnapshot {
        let spec = ghm::Spec::new(loss, bins, momentum, 0.0).expect("valid spec");
        let state = AnyState::Ghm(Density::from_acc_sum(values(bins, seed)));
        job_of(id, MethodSpec::Ghm(Ghm { spec }), state, seed)
    }

    fn job_of(id: &str, method: MethodSpec, state: AnyState, seed: u32) -> JobSnapshot {
        JobSnapshot {
            id: id.to_owned(),
            spec: JobSpec {
                method,
                world_size: seed % 5,
                step_timeout: Duration::new(u64::from(seed), seed * 7 % 1_000_000_000),
                allow_partial_steps: seed % 2 == 1,
            },
            state,
            steps: u64::from(seed) * 3,
            elements: u64::MAX - u64::from(seed),
            next_step: u64::from(seed) + 1,
            world_size_schedule: (0..seed)
                .map(|i| WorldSizeChange {
                    from_step: u64::from(i) * 10,
                    world_size: i + 2,
                })
                .collect(),
            generation: u64::from(seed) * 5 + 1,
            run_id: format!("run-{seed}"),
            create_time: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, seed),
            update_time: SystemTime::UNIX_EPOCH
                .checked_sub(Duration::new(5, 999_999_999))
                .expect("representable"),
        }
    }

    fn seesaw_job(id: &str, seed: u32) -> JobSnapshot {
        let seesaw = Seesaw::new(5, 0.8, 0.0, 1e-3).expect("valid spec");
        let cum_samples = (0..6).map(|i| (i * seed * 1000) as f32).collect();
        let state = AnyState::Seesaw(seesaw.state_from_cum_samples(cum_samples).expect("whole"));
        job_of(id, MethodSpec::Seesaw(seesaw), state, seed)
    }

    fn eqlv2_job(id: &str, seed: u32) -> JobSnapshot {
        let eqlv2 = Eqlv2::new(7, 12.0, 0.8, 4.0).expect("valid spec");
        let (pos_grad, neg_grad) = (values(7, seed), values(7, seed + 1));
        let pos_neg = pos_grad
            .iter()
            .zip(&neg_grad)
            .map(|(pos, neg)| pos / (neg + 1e-10))
            .collect();
        let state = eqlv2
            .state_from_parts(pos_grad, neg_grad, pos_neg)
            .expect("consistent");
        job_of(id, MethodSpec::Eqlv2(eqlv2), AnyState::Eqlv2(state), seed)
    }

    fn sample() -> Vec<JobSnapshot> {
        vec![
            job("team-a/run.1", Loss::GhmC, 10, 0.75, 1),
            job("b", Loss::GhmR, 30, 0.0, 2),
            job("c_3", Loss::GhmR, 1, 0.9, 3),
            seesaw_job("lvis/seesaw", 4),
            eqlv2_job("lvis/eqlv2", 5),
        ]
    }

    /// Every float of every job's state by its bits: `==` on floats would let -0 pass for 0.
    fn bits(jobs: &[JobSnapshot]) -> Vec<Vec<u32>> {
        jobs.iter()
            .map(|job| {
                let arrays: Vec<&[f32]> = match &job.state {
                    AnyState::Ghm(density) => vec![density.acc_sum()],
                    AnyState::Seesaw(state) => vec![state.cum_samples()],
                    AnyState::Eqlv2(state) => {
                        vec![state.pos_grad(), state.neg_grad(), state.pos_neg()]
                    }
                };
                arrays.concat().iter().map(|v| v.to_bits()).collect()
            })
            .collect()
    }

    #[test]
    fn jobs_come_back_bit_for_bit() {
        let jobs = sample();
        let decoded = decode(&encode(&jobs)).expect("decodes");
        assert_eq!(decoded, jobs);
        assert_eq!(bits(&decoded), bits(&jobs));
        assert_eq!(decode(&encode(&[])).expect("decodes"), Vec::new());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let error = decode(&bytes[..len]).expect_err("a truncated file is refused");
            assert!(
                matches!(
                    error,
                    FormatError::ShortHeader { .. } | FormatError::Truncated { .. }
                ),
                "{len}: {error}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_in_the_payload_is_caught_by_the_checksum() {
        let bytes = encode(&sample());
        for offset in HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut corrupt = bytes.clone();
                corrupt[offset] ^= 1 << bit;
                assert!(
                    matches!(decode(&corrupt), Err(FormatError::Checksum { .. })),
                    "byte {offset} bit {bit}"
                );
            }
        }
    }

    /// A file the previous format's code wrote (tests/data/state-v1.md says how, and what
    /// GetJob said of its jobs then) loads, each job at generation 1 with no run id.
    /// Both fixtures hold the same two jobs (tests/data/state-v1.md, state-v2.md), `sync` and
    /// `async` under `prefix`: what they share is checked here.
    fn fixture_jobs(bytes: &[u8], version: u32, prefix: &str) -> Vec<JobSnapshot> {
        assert_eq!(bytes[8..12], version.to_le_bytes(), "the fixture's version");
        let jobs = decode(bytes).expect("the fixture loads");
        assert_eq!(jobs.len(), 2);
        let find = |name: &str| {
            jobs.iter()
                .find(|job| job.id == format!("{prefix}{name}"))
                .unwrap_or_else(|| panic!("{prefix}{name}"))
        };
        let sync = find("sync");
        assert_eq!((sync.steps, sync.elements, sync.next_step), (3, 15, 3));
        assert_eq!(sync.spec.world_size, 2);
        let a = 0.578125f32;
        assert_eq!(
            bits(std::slice::from_ref(sync)),
            vec![
                [0.0, a, a, a, 0.0, a, 0.0, 0.0, 0.0, a]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            ]
        );
        let other = find("async");
        assert_eq!((other.steps, other.elements, other.next_step), (1, 15, 0));
        assert_eq!(bits(std::slice::from_ref(other)), vec![vec![0u32; 5]]);
        jobs
    }

    #[test]
    fn a_version_1_file_loads_with_generation_1() {
        let jobs = fixture_jobs(
            include_bytes!("../../tests/data/state-v1.ghmd"),
            1,
            "fixture/",
        );
        for job in &jobs {
            assert_eq!(job.generation, 1, "{}", job.id);
            assert_eq!(job.run_id, "", "{}", job.id);
        }
        // Written again, it is the current version and comes back the same.
        let rewritten = encode(&jobs);
        assert_eq!(rewritten[8..12], VERSION.to_le_bytes());
        assert_eq!(decode(&rewritten).expect("decodes"), jobs);
    }

    #[test]
    fn a_version_2_file_loads_as_it_was_written() {
        let bytes = include_bytes!("../../tests/data/state-v2.ghmd");
        let jobs = fixture_jobs(bytes, 2, "fixture/v2-");
        let lineages: Vec<(&str, u64, &str)> = jobs
            .iter()
            .map(|job| (job.id.as_str(), job.generation, job.run_id.as_str()))
            .collect();
        assert!(
            lineages.contains(&("fixture/v2-sync", 1, "run-v2")),
            "{lineages:?}"
        );
        assert!(
            lineages.contains(&("fixture/v2-async", 2, "")),
            "{lineages:?}"
        );
        // A GHM job's record is the same in version 3: only the header's version differs.
        let rewritten = encode(&jobs);
        assert_eq!(rewritten[8..12], 3u32.to_le_bytes());
        assert_eq!(rewritten[HEADER_LEN..], bytes[HEADER_LEN..]);
    }

    #[test]
    fn an_older_version_cannot_hold_another_method() {
        let mut bytes = encode(&[seesaw_job("s", 1)]);
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let error = decode(&bytes).expect_err("refused");
        assert!(
            error.to_string().contains("unknown method code 2"),
            "{error}"
        );
    }

    #[test]
    fn header_faults_are_named() {
        let bytes = encode(&sample());
        let mut other_version = bytes.clone();
        other_version[8] = 9;
        assert_eq!(
            decode(&other_version),
            Err(FormatError::Version { found: 9 })
        );
        let mut not_ours = bytes.clone();
        not_ours[0] = b'{';
        assert_eq!(decode(&not_ours), Err(FormatError::Magic));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(FormatError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn a_payload_with_a_valid_checksum_but_a_bad_spec_is_refused() {
        // What a bug or a hand edit could write: the checksum is right, the content is not.
        let mut jobs = sample();
        jobs.truncate(1);
        let mut bytes = encode(&jobs);
        // The loss byte follows the count (8), the id length (4) and the id.
        let loss_at = HEADER_LEN + 8 + 4 + jobs[0].id.len();
        bytes[loss_at] = 7;
        let crc = crc32fast::hash(&bytes[HEADER_LEN..]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        let error = decode(&bytes).expect_err("refused");
        assert!(
            error.to_string().contains("unknown method code 7"),
            "{error}"
        );
        assert!(error.to_string().contains("team-a/run.1"), "{error}");
    }
}
