//! `msys.v1.UserService` over gRPC: parse the request, run the repository
//! call, wake the relay after a committed change. Creates and reads by id,
//! the hot paths, go through batchers (see `batch`) so that concurrent calls
//! share statements.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::{
    domain::{Email, UserChanges, UserName},
    repo::{self, NewUser},
};
use crate::{
    batch::{BatchLimits, Batcher},
    deadline,
    error::ServiceError,
    metrics::Registry,
    pb::{self, user_service_server::UserService},
    trace::TraceContext,
    validate::{Page, parse_id},
};

type Answer = Result<pb::User, ServiceError>;

pub struct UserApi {
    pool: Pool,
    relay: Arc<Notify>,
    creates: Batcher<NewUser, Answer>,
    reads: Batcher<i64, Answer>,
}

impl UserApi {
    /// Starts the create and read batchers; `metrics` counts their statements
    /// (`*_batches_total`) and the calls those carried (`*_batched_calls_total`),
    /// whose quotient is the average batch size.
    /// The batchers' tasks run on `tasks`, the role's tracker.
    pub fn new(pool: Pool, relay: Arc<Notify>, limits: BatchLimits, metrics: Registry, tasks: &TaskTracker) -> Self {
        let count = |metrics: &Registry, batches: &'static str, calls: &'static str, n: usize| {
            metrics.add(batches, 1);
            metrics.add(calls, n as i64);
        };
        let depth = metrics.gauge("batch_queue_depth");
        let creates = Batcher::spawn_counted("create user", limits, tasks, depth.clone(), {
            let (pool, metrics) = (pool.clone(), metrics.clone());
            move |batch: Vec<NewUser>, deadline| {
                count(&metrics, "create_batches_total", "create_batched_calls_total", batch.len());
                let pool = pool.clone();
                async move { repo::create_batch(&pool, batch, deadline).await }
            }
        });
        let reads = Batcher::spawn_counted("get user", limits, tasks, depth, {
            let pool = pool.clone();
            move |ids: Vec<i64>, deadline| {
                count(&metrics, "get_batches_total", "get_batched_calls_total", ids.len());
                let pool = pool.clone();
                async move { repo::get_batch(&pool, ids, deadline).await }
            }
        });
        UserApi { pool, relay, creates, reads }
    }
}

/// The `idempotency-key` metadata of a CreateUser: a retry carrying the key
/// of an earlier call gets the user that call created.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;

fn idempotency_key(metadata: &MetadataMap) -> Result<Option<String>, ServiceError> {
    let Some(value) = metadata.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let key = value.to_str().map_err(|_| ServiceError::invalid("idempotency-key", "must be printable ASCII"))?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(ServiceError::invalid(
            "idempotency-key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// A batch that went away without answering (shutdown cut it off, or it
/// failed outright): whether the change happened is unknown to us here, so
/// the client is told to retry, which the unique email makes safe, and an
/// idempotency key makes answer with the same user.
fn dropped(error: crate::batch::Dropped) -> ServiceError {
    ServiceError::Unavailable(
        "the request was cut off before the database answered, try again".into(),
        Some(error.into()),
    )
}

/// Mutations get an info span (their log lines carry it); reads a debug one: at the
/// default level a read then pays for no span, which was a twentieth of a GetUser's cost.
#[tonic::async_trait]
impl UserService for UserApi {
    #[tracing::instrument(skip_all)]
    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Result<Response<pb::User>, Status> {
        let (deadline, request_id) = (deadline::of(request.metadata()), idempotency_key(request.metadata())?);
        let trace = TraceContext::for_change(request.metadata());
        let request = request.into_inner();
        let name = UserName::parse(&request.name)?;
        let email = Email::parse(&request.email)?;
        let user = self.creates.call(NewUser { name, email, request_id, trace }, deadline).await.map_err(dropped)??;
        self.relay.notify_one();
        tracing::info!(user.id = user.id, "created user");
        Ok(Response::new(user))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user.id = request.get_ref().id))]
    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let id = parse_id("id", request.get_ref().id)?;
        Ok(Response::new(self.reads.call(id, deadline::of(request.metadata())).await.map_err(dropped)??))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let deadline = deadline::of(request.metadata());
        let request = request.get_ref();
        let page = Page::parse(request.page_size, &request.page_token)?;
        let (users, next) = repo::list(&self.pool, page, deadline).await?;
        Ok(Response::new(pb::ListUsersResponse { users, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().id))]
    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Result<Response<pb::User>, Status> {
        let (deadline, trace) = (deadline::of(request.metadata()), TraceContext::for_change(request.metadata()));
        let request = request.into_inner();
        let id = parse_id("id", request.id)?;
        let changes = UserChanges::parse(request.name.as_deref(), request.email.as_deref())?;
        let user = repo::update(&self.pool, id, &changes, &trace, deadline).await?;
        self.relay.notify_one();
        tracing::info!("updated user");
        Ok(Response::new(user))
    }

    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().id))]
    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let id = parse_id("id", request.get_ref().id)?;
        let trace = TraceContext::for_change(request.metadata());
        repo::delete(&self.pool, id, &trace, deadline::of(request.metadata())).await?;
        self.relay.notify_one();
        tracing::info!("deleted user");
        Ok(Response::new(pb::DeleteUserResponse {}))
    }
}
