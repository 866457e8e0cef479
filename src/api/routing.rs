//! The `x-ghmd-job` header: a proxy in front of N replicas routes each job by it, so a call whose
//! header and message disagree would be weighed by a replica the proxy did not mean, and a
//! stream that mixed jobs would pin some of them to the wrong replica.

use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

use super::error_info::{JOB_HEADER_MISMATCH, JOB_HEADER_MISSING, status_with_reason};

/// The metadata key clients put the job id in.
pub const JOB_HEADER: &str = "x-ghmd-job";

/// What the routing checks report, so that the metrics count refusals without the API knowing
/// Prometheus.
pub trait RoutingObserver: Send + Sync + 'static {
    /// A call was refused for its header: `missing` true for JOB_HEADER_MISSING.
    fn job_header_refused(&self, _missing: bool) {}
}

struct Unobserved;

impl RoutingObserver for Unobserved {}

/// The routing policy of a server.
#[derive(Clone)]
pub struct Routing {
    /// `--require-job-header`: a call without the header is refused.
    require_header: bool,
    observer: Arc<dyn RoutingObserver>,
}

impl Default for Routing {
    fn default() -> Self {
        Self::new(false, Arc::new(Unobserved))
    }
}

/// A hostile header may be long; messages quote only its start.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_owned(),
    }
}

impl Routing {
    pub fn new(require_header: bool, observer: Arc<dyn RoutingObserver>) -> Self {
        Self {
            require_header,
            observer,
        }
    }

    fn mismatch(&self, message: String) -> Status {
        self.observer.job_header_refused(false);
        status_with_reason(
            tonic::Code::InvalidArgument,
            message,
            JOB_HEADER_MISMATCH,
            &[],
        )
    }

    /// The header's job id, `None` without one (refused if the header is required).
    fn header(&self, metadata: &MetadataMap) -> Result<Option<String>, Status> {
        match metadata.get(JOB_HEADER) {
            Some(value) => match value.to_str() {
                Ok(job) => Ok(Some(job.to_owned())),
                Err(_) => Err(self.mismatch(format!(
                    "the {JOB_HEADER} header is not visible ASCII: it must be the job id"
                ))),
            },
            None if self.require_header => {
                self.observer.job_header_refused(true);
                Err(status_with_reason(
                    tonic::Code::InvalidArgument,
                    format!(
                        "the {JOB_HEADER} header is missing: this server is behind a proxy that \
                         routes jobs by it (--require-job-header); send the job id in it"
                    ),
                    JOB_HEADER_MISSING,
                    &[],
                ))
            }
            None => Ok(None),
        }
    }

    /// Checks a unary job-scoped call (after its job id is validated).
    pub fn check_call(&self, metadata: &MetadataMap, job_id: &str) -> Result<(), Status> {
        match self.header(metadata)? {
            Some(header) if header != job_id => Err(self.mismatch(format!(
                "the {JOB_HEADER} header names job {:?}, the request job {job_id:?}: a proxy \
                 routes by the header, so both must name the same job",
                shown(&header)
            ))),
            _ => Ok(()),
        }
    }

    /// The route of a new stream: the header's job, or none yet.
    pub fn open_stream(&self, metadata: &MetadataMap) -> Result<StreamRoute, Status> {
        Ok(StreamRoute {
            routing: self.clone(),
            from_header: metadata.get(JOB_HEADER).is_some(),
            job: self.header(metadata)?,
        })
    }
}

/// The one job a HarmonizeStream carries: its header's, or else its first message's.
pub struct StreamRoute {
    routing: Routing,
    from_header: bool,
    job: Option<String>,
}

impl StreamRoute {
    /// Checks one message of the stream (after its job id is validated).
    pub fn check(&mut self, job_id: &str) -> Result<(), Status> {
        match &self.job {
            None => {
                self.job = Some(job_id.to_owned());
                Ok(())
            }
            Some(job) if job == job_id => Ok(()),
            Some(job) if self.from_header => Err(self.routing.mismatch(format!(
                "the {JOB_HEADER} header names job {:?}, this message job {job_id:?}: a stream \
                 carries one job's messages, the one its header names",
                shown(job)
            ))),
            Some(job) => Err(self.routing.mismatch(format!(
                "this stream carries job {job:?} (its first message's), this message names \
                 {job_id:?}: a stream carries one job's messages; open one stream per job"
            ))),
        }
    }
}
