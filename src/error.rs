//! The errors RPC handlers return, and the one place they become a gRPC
//! `Status`. Handlers say *what* went wrong; this module decides how a client
//! sees it. Unexpected failures are logged here with their whole cause chain
//! and reach the client only as a generic message.

use std::sync::Arc;

use tonic::{Code, Status};

use crate::db::DbError;

#[derive(thiserror::Error, Debug)]
pub enum ServiceError {
    /// The request itself is wrong; the message names the field.
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well-formed but the system is not in a state to accept it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (database, broker, another service) cannot be reached;
    /// the client may retry.
    #[error("{0}")]
    Unavailable(String, #[source] Option<anyhow::Error>),
    /// A conflict with a concurrent transaction (serialization failure,
    /// deadlock): the whole call may be retried as it is.
    #[error("{0}")]
    Aborted(String, #[source] Option<anyhow::Error>),
    /// The caller's deadline passed, here or at the database.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Too much at once: the server or the database is at its limit; retry
    /// later, with backoff.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
    /// One failure answered to every request of a batch (see `batch`).
    #[error(transparent)]
    Shared(Arc<ServiceError>),
}

impl ServiceError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ServiceError::InvalidArgument { field, message: message.into() }
    }
}

impl From<DbError> for ServiceError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Unavailable(source) => {
                ServiceError::Unavailable("database unavailable, try again".into(), Some(source))
            }
            DbError::Conflict(source) => ServiceError::Aborted(
                "the request conflicted with a concurrent one and was rolled back; try again".into(),
                Some(source.into()),
            ),
            DbError::TimedOut => {
                ServiceError::DeadlineExceeded("the deadline passed before the database answered".into())
            }
            DbError::Exhausted(source) => {
                tracing::warn!(error.cause_chain = ?source, "database refused a connection: too many connections");
                ServiceError::ResourceExhausted("the database has no connection to spare; retry with backoff".into())
            }
            DbError::Decode(column, source) => {
                ServiceError::Unexpected(anyhow::Error::new(source).context(format!("reading column {column}")))
            }
            DbError::Query(source) => {
                ServiceError::Unexpected(anyhow::Error::new(source).context("database query failed"))
            }
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        status(&error)
    }
}

/// The one mapping from what went wrong to what the client hears.
fn status(error: &ServiceError) -> Status {
    let code = match error {
        ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
        ServiceError::NotFound(_) => Code::NotFound,
        ServiceError::AlreadyExists(_) => Code::AlreadyExists,
        ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
        ServiceError::Unavailable(..) => Code::Unavailable,
        ServiceError::Aborted(..) => Code::Aborted,
        ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ServiceError::ResourceExhausted(_) => Code::ResourceExhausted,
        ServiceError::Unexpected(_) => Code::Internal,
        ServiceError::Shared(inner) => return status(inner),
    };
    match error {
        ServiceError::Unexpected(cause) => {
            tracing::error!(error.message = %cause, error.cause_chain = ?cause, "request failed unexpectedly");
            Status::internal("internal error; the server log has the details")
        }
        ServiceError::Unavailable(message, cause) => {
            tracing::warn!(error.message = %message, error.cause_chain = ?cause, "dependency unavailable");
            Status::unavailable(message.clone())
        }
        ServiceError::Aborted(message, cause) => {
            tracing::info!(error.message = %message, error.cause_chain = ?cause, "transaction conflict");
            Status::aborted(message.clone())
        }
        _ => Status::new(code, error.to_string()),
    }
}
