//! How the allocator treats the multi-megabyte buffers of raw requests. Measured, not assumed
//! (BENCHMARKS.md, "Allocator"): a 1M-element request allocates about 13 MB (tonic's receive
//! and send buffers, the per-element bins, the weights), and with glibc's defaults much of it
//! goes back to the kernel when freed, to be faulted in again, page by page, by the next
//! request. With 4 connections that cost the server 5.1 ms of CPU per request instead of 3.5.
//! mimalloc, tried as the alternative, did no better than glibc's defaults.

/// Largest allocation served from the heap rather than by its own mmap (glibc's ceiling).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap kept rather than returned to the kernel.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Environment variables through which an operator sets glibc's malloc themselves; if any is
/// set, ghmd leaves the allocator alone.
const OPERATOR_SETTINGS: [&str; 3] = [
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
];

/// What [`keep_large_buffers`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// Freed buffers up to 32 MiB are kept for reuse.
    Kept,
    /// The operator's own settings are in the environment.
    LeftToOperator,
    /// Not glibc (or glibc refused): the allocator's defaults apply.
    Unavailable,
}

/// Keeps freed buffers of up to 32 MiB in the process for the next request instead of
/// returning them to the kernel. Call once at start-up; the resident set then stays near its
/// peak rather than shrinking after a burst of large requests.
pub fn keep_large_buffers() -> Tuning {
    if OPERATOR_SETTINGS
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return Tuning::LeftToOperator;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Tuning {
    // SAFETY: mallopt only changes malloc's parameters, under malloc's own lock (glibc
    // documents it MT-Safe); no memory is touched and nothing else is assumed.
    let set = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if set {
        Tuning::Kept
    } else {
        Tuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_thresholds() {
        // The test harness sets none of the operator variables.
        if OPERATOR_SETTINGS
            .iter()
            .all(|name| std::env::var_os(name).is_none())
        {
            let expected = if cfg!(all(target_os = "linux", target_env = "gnu")) {
                Tuning::Kept
            } else {
                Tuning::Unavailable
            };
            assert_eq!(keep_large_buffers(), expected);
        }
    }
}
