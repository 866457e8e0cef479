//! The GHM math, bit for bit as mmdetection's `GHMC`/`GHMR` compute it in float32.
//!
//! Pure functions on slices: no async, no I/O, nothing of gRPC. A step is weighed in three parts
//! so that the caller can hold a job's lock only for the middle one, which is O(bins):
//! 1. [`bin_batch`] validates a batch, counts its valid elements per bin and keeps each
//!    element's bin in a byte (O(elements)); [`count_batch`] counts without keeping them;
//! 2. [`Density::step`] folds the counts into the EMA density and yields a [`BinTable`];
//! 3. [`BinnedBatch::write_weights`] gives every element its bin's weight (O(elements));
//!    [`write_weights`] does the same from the norms, binning them again.
//!
//! Step-synchronous jobs sum the counts of several ranks between 1 and 2; since counts are
//! integers, the sum does not depend on the order the ranks arrive in.
//!
//! The O(elements) loops are in `slots`, written for the compiler to vectorise and run with the
//! widest vector instructions the CPU has (BENCHMARKS.md has their figures).

mod bins;
mod density;
mod error;
mod kernel;
mod slots;
mod spec;

pub use bins::BinEdges;
pub use density::{BatchCounts, BinTable, Density};
pub use error::{InputError, InputField};
pub use kernel::{
    BinnedBatch, bin_batch, count_batch, float32_views, norms_from_residuals, validate_histogram,
    write_weights,
};
pub use spec::{DEFAULT_MU, Loss, MAX_BINS, Spec, SpecError};
