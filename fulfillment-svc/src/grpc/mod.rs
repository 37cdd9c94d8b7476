//! The gRPC boundary: service implementations and the one mapping from internal errors to
//! gRPC status codes.

pub mod ingest;
pub mod query;

use tonic::Status;

use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "storage unavailable");
                Status::unavailable("storage is unavailable; retry")
            }
            StoreError::Internal(_) | StoreError::Setup(_) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal("internal storage error")
            }
        }
    }
}
