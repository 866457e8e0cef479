//! A job's GHM parameters (loss, bins, momentum, mu), checked once where they are made, so that
//! the kernels need not check them again.

/// The largest bin count a job may ask for. mmdetection uses 10 to 30; 4096 keeps a job's state
/// and every response table small while leaving room for experiments.
pub const MAX_BINS: u32 = 4096;

/// mmdetection's default ASL1 parameter for GHM-R.
pub const DEFAULT_MU: f64 = 0.02;

/// A job spec the math cannot work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.bins = {bins}: must be 1 to {max}", max = MAX_BINS)]
    Bins { bins: u32 },
    #[error("spec.momentum = {momentum}: must be in [0, 1)")]
    Momentum { momentum: f64 },
    #[error(
        "spec.mu = {mu}: must be > 0 with mu * mu a nonzero finite float32, about 3e-23 to 1.8e19 (0 selects the default {default})",
        default = DEFAULT_MU
    )]
    Mu { mu: f64 },
    #[error("spec.mu = {mu}: GHM-C has no mu, leave it 0")]
    MuForGhmC { mu: f64 },
}

/// Which GHM loss a job weighs for. The two differ in their last bin edge and in how `tot` is
/// counted, nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loss {
    GhmC,
    GhmR,
}

/// The parameters the weights depend on, checked once at job creation so that the kernels need
/// not check them again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    loss: Loss,
    bins: u32,
    momentum: f64,
    mu: f64,
}

/// g is derived with `mu * mu` rounded to f32 once: a square that underflows to 0 turns a
/// residual of exactly 0 into a NaN norm (0 / 0), one that overflows turns every norm into 0.
fn mu_is_usable(mu: f64) -> bool {
    let squared = (mu * mu) as f32;
    mu > 0.0 && squared > 0.0 && squared.is_finite()
}

impl Spec {
    /// `mu` of 0 selects [`DEFAULT_MU`] for GHM-R; GHM-C has no mu and keeps 0.
    pub fn new(loss: Loss, bins: u32, momentum: f64, mu: f64) -> Result<Self, SpecError> {
        if bins == 0 || bins > MAX_BINS {
            return Err(SpecError::Bins { bins });
        }
        // Written so that NaN fails too.
        if !(0.0..1.0).contains(&momentum) {
            return Err(SpecError::Momentum { momentum });
        }
        let mu = match loss {
            Loss::GhmC if mu != 0.0 => return Err(SpecError::MuForGhmC { mu }),
            Loss::GhmC => 0.0,
            Loss::GhmR if mu == 0.0 => DEFAULT_MU,
            Loss::GhmR if !mu_is_usable(mu) => return Err(SpecError::Mu { mu }),
            Loss::GhmR => mu,
        };
        Ok(Self {
            loss,
            bins,
            momentum,
            mu,
        })
    }

    pub fn loss(&self) -> Loss {
        self.loss
    }

    pub fn bins(&self) -> usize {
        self.bins as usize
    }

    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// The ASL1 parameter after defaulting; 0 for GHM-C.
    pub fn mu(&self) -> f64 {
        self.mu
    }

    /// A job with momentum 0 keeps no state between steps.
    pub fn uses_ema(&self) -> bool {
        self.momentum > 0.0
    }
}
