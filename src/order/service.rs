//! `msys.v1.OrderService` over gRPC.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tonic::{Request, Response, Status};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    arrivals::{Arrivals, Waiter},
    domain::{NewOrder, cancel_reason},
    repo::{self, Placement},
};
use crate::{
    deadline,
    error::ServiceError,
    metrics::Registry,
    pb::{self, order_service_server::OrderService},
    validate::{Page, parse_id},
};

pub struct OrderApi {
    pool: Pool,
    arrivals: Arrivals,
    user_wait: Duration,
    /// Bounds the CreateOrder calls waiting for a user at once: each holds a
    /// request and a registration, and an unbounded number of them is how a
    /// burst of orders for not-yet-known users would exhaust the process.
    waiters: Arc<Semaphore>,
    max_waiters: usize,
    metrics: Registry,
}

/// A waiter's place, counted in the `create_order_waiters` gauge while held.
struct WaiterSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Registry,
}

impl WaiterSlot {
    fn take(waiters: &Arc<Semaphore>, metrics: &Registry) -> Option<Self> {
        let permit = waiters.clone().try_acquire_owned().ok()?;
        metrics.add(WAITERS_GAUGE, 1);
        Some(WaiterSlot { _permit: permit, metrics: metrics.clone() })
    }
}

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.metrics.add(WAITERS_GAUGE, -1);
    }
}

/// CreateOrder calls waiting for their user right now.
pub const WAITERS_GAUGE: &str = "create_order_waiters";
/// Times a waiting CreateOrder call was woken to look for its user again:
/// only its own user's arrival wakes it.
pub const WAKEUPS: &str = "user_wait_wakeups_total";

impl OrderApi {
    pub fn new(pool: Pool, arrivals: Arrivals, user_wait: Duration, max_waiters: usize, metrics: Registry) -> Self {
        let max_waiters = max_waiters.max(1);
        metrics.set(WAITERS_GAUGE, 0);
        metrics.add(WAKEUPS, 0);
        let waiters = Arc::new(Semaphore::new(max_waiters));
        OrderApi { pool, arrivals, user_wait, waiters, max_waiters, metrics }
    }

    /// Places the order, giving a user created a moment ago up to
    /// `user_wait` (or less, if the caller's deadline is nearer) for its
    /// event to be applied here. We wait rather than ask the user service:
    /// the order service then keeps working while the user service is down,
    /// and the answer is always the one the replica will give a moment later.
    /// A deleted user is refused at once. A call that waited and was woken
    /// by this process's replica links its span to the apply's.
    async fn place(&self, order: &NewOrder, deadline: Option<Instant>) -> Result<pb::Order, ServiceError> {
        let wait_until = (Instant::now() + self.user_wait).min(deadline.unwrap_or_else(far_future));
        if let Some(placed) = self.try_place(order, deadline, wait_until).await? {
            return Ok(placed);
        }
        // Not known yet: take a waiter's place, if one is free, and wait for
        // this user's bell (or the end of the wait) before each new look.
        let _slot = WaiterSlot::take(&self.waiters, &self.metrics).ok_or_else(|| {
            ServiceError::ResourceExhausted(format!(
                "user {} is not known yet and {} CreateOrder calls already wait for their users \
                 (ORDER_MAX_USER_WAITERS); retry later",
                order.user_id, self.max_waiters
            ))
        })?;
        let waiter = self.arrivals.register(order.user_id);
        loop {
            // Enabled before looking, so an arrival in between still wakes us.
            let bell = waiter.bell().notified();
            tokio::pin!(bell);
            bell.as_mut().enable();
            let placed = self.try_place(order, deadline, wait_until).await.inspect_err(|_| link_to_apply(&waiter))?;
            if let Some(placed) = placed {
                link_to_apply(&waiter);
                return Ok(placed);
            }
            tokio::select! {
                _ = bell => self.metrics.add(WAKEUPS, 1),
                _ = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    /// One attempt: the order, or None if the user is not known yet and
    /// there is time left to wait for them.
    async fn try_place(
        &self,
        order: &NewOrder,
        deadline: Option<Instant>,
        wait_until: Instant,
    ) -> Result<Option<pb::Order>, ServiceError> {
        match repo::place(&self.pool, order, deadline).await? {
            Placement::Placed(placed) => Ok(Some(placed)),
            Placement::DeletedUser => {
                Err(ServiceError::FailedPrecondition(format!("user {} was deleted", order.user_id)))
            }
            Placement::UnknownUser if Instant::now() >= wait_until => {
                Err(ServiceError::FailedPrecondition(format!("user {} does not exist", order.user_id)))
            }
            Placement::UnknownUser => Ok(None),
        }
    }
}

/// Links the current span (the CreateOrder that waited) to the span of the
/// apply that brought its user, if this process applied it with traces on:
/// the trace of the user's creation and the order's trace join there.
fn link_to_apply(waiter: &Waiter) {
    if let Some(apply) = waiter.applied_by() {
        tracing::Span::current().add_link(apply);
    }
}

/// A deadline that never comes, for `min` with one that may not exist.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().user_id))]
    async fn create_order(&self, request: Request<pb::CreateOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let order = NewOrder::parse(request.get_ref())?;
        let placed = self.place(&order, deadline::of(request.metadata())).await?;
        tracing::info!(order.id = placed.id, "placed order");
        Ok(Response::new(placed))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(order.id = request.get_ref().id))]
    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let id = parse_id("id", request.get_ref().id)?;
        Ok(Response::new(repo::get(&self.pool, id, deadline::of(request.metadata())).await?))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user.id = request.get_ref().user_id))]
    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let deadline = deadline::of(request.metadata());
        let request = request.get_ref();
        let user_id = parse_id("user_id", request.user_id)?;
        let page = Page::parse(request.page_size, &request.page_token)?;
        let (orders, next) = repo::list(&self.pool, user_id, page, deadline).await?;
        Ok(Response::new(pb::ListOrdersResponse { orders, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(skip_all, fields(order.id = request.get_ref().id))]
    async fn cancel_order(&self, request: Request<pb::CancelOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let deadline = deadline::of(request.metadata());
        let request = request.get_ref();
        let id = parse_id("id", request.id)?;
        let reason = cancel_reason(&request.reason)?;
        Ok(Response::new(repo::cancel(&self.pool, id, &reason, deadline).await?))
    }
}
