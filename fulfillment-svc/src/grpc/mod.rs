//! The gRPC boundary: service implementations, the methods and their roles, bearer-token
//! auth, and the one mapping
//! from internal errors to gRPC status codes.

pub mod auth;
pub mod ingest;
pub mod methods;
pub mod query;

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Conflict(_) => {
                tracing::warn!(error = %e, "storage unavailable");
                Status::unavailable("storage is unavailable; retry")
            }
            StoreError::Precondition(why) => Status::failed_precondition(why),
            StoreError::NotFound(why) => Status::not_found(why),
            StoreError::Internal(_) | StoreError::Setup(_) => {
                tracing::error!(error = %e, "storage failure");
                Status::internal("internal storage error")
            }
        }
    }
}

/// `INVALID_ARGUMENT` naming the field and what to put there, in the message and as a
/// `google.rpc.BadRequest` field violation for programs.
pub(crate) fn invalid(field: &str, fix: &str) -> Status {
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {fix}"),
        ErrorDetails::with_bad_request_violation(field, fix),
    )
}
