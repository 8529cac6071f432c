//! Why the coordinator refuses a call, and how that maps onto gRPC status codes.

use tonic::Status;

/// Why the coordinator cannot serve a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listening, TLS or authentication setup failed.
    #[error(transparent)]
    Net(#[from] cluster_proto::Error),
    /// The checkpoint root cannot be used.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The checkpoint to resume from does not fit this run.
    #[error("cannot resume: {0}")]
    Resume(String),
}

/// A refused request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    /// The run already started; new workers cannot join it.
    #[error("the run has already started (stage {0}); start a new run to add workers")]
    Started(&'static str),
    /// All expected workers have joined.
    #[error("the cluster is full: all {0} expected workers have joined")]
    Full(usize),
    /// The run is over.
    #[error("the run is over (stage {0})")]
    Finished(&'static str),
    /// The caller named a worker id the coordinator does not know.
    #[error("unknown worker id {0:?}: it left the run or never joined")]
    UnknownWorker(String),
    /// A message from an older ring.
    #[error("stale ring generation {got}; the current generation is {current}")]
    Stale {
        /// Generation in the message.
        got: u64,
        /// The coordinator's generation.
        current: u64,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request comes before the run is ready for it (a checkpoint commit that overtook
    /// another rank's epoch report): the service holds it until the run changes.
    #[error("{0}")]
    NotYet(String),
    /// The request was right when it was sent, but the run has moved on (the ring was
    /// re-formed, the epoch goes on): not the caller's fault, nothing to retry.
    #[error("{0}")]
    Superseded(String),
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            Refusal::Started(_) | Refusal::Finished(_) | Refusal::Stale { .. } => {
                Status::failed_precondition(message)
            }
            Refusal::Full(_) => Status::resource_exhausted(message),
            Refusal::UnknownWorker(_) => Status::not_found(message),
            Refusal::BadRequest(_) => Status::invalid_argument(message),
            Refusal::NotYet(_) => Status::unavailable(message),
            Refusal::Superseded(_) => Status::aborted(message),
        }
    }
}
