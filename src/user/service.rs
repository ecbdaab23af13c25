//! `msys.v1.UserService` over gRPC: parse the request, run the repository
//! call, wake the relay after a committed change.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::{
    domain::{Email, UserChanges, UserName},
    repo,
};
use crate::{
    pb::{self, user_service_server::UserService},
    validate::{Page, parse_id},
};

pub struct UserApi {
    pool: Pool,
    relay: Arc<Notify>,
}

impl UserApi {
    pub fn new(pool: Pool, relay: Arc<Notify>) -> Self {
        UserApi { pool, relay }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[tracing::instrument(skip_all)]
    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Result<Response<pb::User>, Status> {
        let request = request.into_inner();
        let name = UserName::parse(&request.name)?;
        let email = Email::parse(&request.email)?;
        let user = repo::create(&self.pool, &name, &email).await?;
        self.relay.notify_one();
        tracing::info!(user.id = user.id, "created user");
        Ok(Response::new(user))
    }

    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().id))]
    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let id = parse_id("id", request.get_ref().id)?;
        Ok(Response::new(repo::get(&self.pool, id).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let request = request.get_ref();
        let page = Page::parse(request.page_size, &request.page_token)?;
        let (users, next) = repo::list(&self.pool, page).await?;
        Ok(Response::new(pb::ListUsersResponse { users, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(skip_all, fields(user.id = request.get_ref().id))]
    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Result<Response<pb::User>, Status> {
        let request = request.into_inner();
        let id = parse_id("id", request.id)?;
        let changes = UserChanges::parse(request.name.as_deref(), request.email.as_deref())?;
        let user = repo::update(&self.pool, id, &changes).await?;
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
        repo::delete(&self.pool, id).await?;
        self.relay.notify_one();
        tracing::info!("deleted user");
        Ok(Response::new(pb::DeleteUserResponse {}))
    }
}
