//! Job specs as the tests write them: a loss, its bins and momentum, then what differs.

use std::time::Duration;

use ghmd::proto::{Eqlv2Spec, JobSpec, Loss, SeesawSpec, job_spec};

pub fn ghm_c(bins: u32, momentum: f64) -> JobSpec {
    JobSpec {
        loss: Loss::GhmC.into(),
        bins,
        momentum,
        ..Default::default()
    }
}

pub fn ghm_r(bins: u32, momentum: f64) -> JobSpec {
    JobSpec {
        loss: Loss::GhmR.into(),
        ..ghm_c(bins, momentum)
    }
}

/// The proto spec of a job of the pure module's loss.
pub fn of_loss(loss: ghmd::ghm::Loss, bins: u32, momentum: f64) -> JobSpec {
    match loss {
        ghmd::ghm::Loss::GhmC => ghm_c(bins, momentum),
        ghmd::ghm::Loss::GhmR => ghm_r(bins, momentum),
    }
}

/// `spec` over `world_size` ranks (0 and 1 are asynchronous), with the server's step timeout.
pub fn with_world(spec: JobSpec, world_size: u32) -> JobSpec {
    JobSpec { world_size, ..spec }
}

/// `spec` made step-synchronous over `world_size` ranks that wait `step_timeout` for each other.
pub fn step_synchronous(spec: JobSpec, world_size: u32, step_timeout: Duration) -> JobSpec {
    JobSpec {
        step_timeout: Some(duration(step_timeout)),
        ..with_world(spec, world_size)
    }
}

pub fn duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A Seesaw job's spec; its other fields as for GHM.
pub fn with_seesaw(spec: SeesawSpec) -> JobSpec {
    JobSpec {
        method: Some(job_spec::Method::Seesaw(spec)),
        ..Default::default()
    }
}

/// An EQLv2 job's spec; its other fields as for GHM.
pub fn with_eqlv2(spec: Eqlv2Spec) -> JobSpec {
    JobSpec {
        method: Some(job_spec::Method::Eqlv2(spec)),
        ..Default::default()
    }
}

/// Seesaw of `num_classes` with mmdetection's defaults, which the server fills in.
pub fn seesaw(num_classes: u32) -> JobSpec {
    with_seesaw(SeesawSpec {
        num_classes,
        ..Default::default()
    })
}

/// EQLv2 of `num_classes` with mmdetection's defaults, which the server fills in.
pub fn eqlv2(num_classes: u32) -> JobSpec {
    with_eqlv2(Eqlv2Spec {
        num_classes,
        ..Default::default()
    })
}
