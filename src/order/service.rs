//! `msys.v1.OrderService` over gRPC.

use std::{sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use tokio::{sync::Notify, time::Instant};
use tonic::{Request, Response, Status};

use super::{
    domain::{NewOrder, cancel_reason},
    repo::{self, Placement},
};
use crate::{
    error::ServiceError,
    pb::{self, order_service_server::OrderService},
    validate::{Page, parse_id},
};

/// How often a waiting CreateOrder looks again when the event may be
/// applied by another order process (whose progress rings no bell here).
const RECHECK: Duration = Duration::from_millis(50);

pub struct OrderApi {
    pool: Pool,
    applied: Arc<Notify>,
    user_wait: Duration,
}

impl OrderApi {
    pub fn new(pool: Pool, applied: Arc<Notify>, user_wait: Duration) -> Self {
        OrderApi { pool, applied, user_wait }
    }

    /// Places the order, giving a user created a moment ago up to
    /// `user_wait` for its event to be applied here. We wait rather than ask
    /// the user service: the order service then keeps working while the
    /// user service is down, and the answer is always the one the replica
    /// will give a moment later. A deleted user is refused at once.
    async fn place(&self, order: &NewOrder) -> Result<pb::Order, ServiceError> {
        let deadline = Instant::now() + self.user_wait;
        loop {
            // Registered before looking, so an event applied in between
            // still wakes us.
            let applied = self.applied.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            match repo::place(&self.pool, order).await? {
                Placement::Placed(placed) => return Ok(placed),
                Placement::DeletedUser => {
                    return Err(ServiceError::FailedPrecondition(format!("user {} was deleted", order.user_id)));
                }
                Placement::UnknownUser if Instant::now() >= deadline => {
                    return Err(ServiceError::FailedPrecondition(format!("user {} does not exist", order.user_id)));
                }
                Placement::UnknownUser => {
                    let wake = (Instant::now() + RECHECK).min(deadline);
                    tokio::select! {
                        _ = applied => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().user_id))]
    async fn create_order(&self, request: Request<pb::CreateOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let order = NewOrder::parse(request.get_ref())?;
        let placed = self.place(&order).await?;
        tracing::info!(order.id = placed.id, "placed order");
        Ok(Response::new(placed))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(order.id = request.get_ref().id))]
    async fn get_order(&self, request: Request<pb::GetOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let id = parse_id("id", request.get_ref().id)?;
        Ok(Response::new(repo::get(&self.pool, id).await?))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(user.id = request.get_ref().user_id))]
    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let request = request.get_ref();
        let user_id = parse_id("user_id", request.user_id)?;
        let page = Page::parse(request.page_size, &request.page_token)?;
        let (orders, next) = repo::list(&self.pool, user_id, page).await?;
        Ok(Response::new(pb::ListOrdersResponse { orders, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(skip_all, fields(order.id = request.get_ref().id))]
    async fn cancel_order(&self, request: Request<pb::CancelOrderRequest>) -> Result<Response<pb::Order>, Status> {
        let request = request.get_ref();
        let id = parse_id("id", request.id)?;
        let reason = cancel_reason(&request.reason)?;
        Ok(Response::new(repo::cancel(&self.pool, id, &reason).await?))
    }
}
