//! The UserService contract: happy paths and every error a client can cause.

use msys::pb;
use tonic::Code;

use crate::support::{TestResult, UserSystem};

fn assert_status(result: Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>, code: Code, mentions: &str) {
    match result {
        Ok(response) => panic!("expected {code:?}, got {response:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(mentions), "{:?} should mention {mentions:?}", status.message());
        }
    }
}

#[tokio::test]
async fn create_get_update_delete_round_trip() -> TestResult {
    let mut system = UserSystem::start().await;
    let created = system.create("  Ada Lovelace ", "ada@example.org").await;
    assert!(created.id > 0);
    assert_eq!(created.name, "Ada Lovelace", "names are trimmed");
    assert_eq!(created.version, 1);
    assert!(created.created_at.is_some() && created.updated_at.is_some());

    let fetched = system.client.get_user(pb::GetUserRequest { id: created.id }).await?.into_inner();
    assert_eq!(fetched, created);

    let renamed = system
        .client
        .update_user(pb::UpdateUserRequest { id: created.id, name: Some("Ada King".into()), email: None })
        .await?
        .into_inner();
    assert_eq!(renamed.name, "Ada King");
    assert_eq!(renamed.email, "ada@example.org", "unset fields keep their value");
    assert_eq!(renamed.version, 2);

    system.client.delete_user(pb::DeleteUserRequest { id: created.id }).await?;
    assert_status(
        system.client.get_user(pb::GetUserRequest { id: created.id }).await,
        Code::NotFound,
        "does not exist",
    );
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn list_users_pages_through_everyone_in_id_order() -> TestResult {
    let mut system = UserSystem::start().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(system.create(&format!("user {i}"), &format!("u{i}@example.org")).await.id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = system
            .client
            .list_users(pb::ListUsersRequest { page_size: 3, page_token: token.clone() })
            .await?
            .into_inner();
        assert!(page.users.len() <= 3);
        seen.extend(page.users.iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn invalid_input_is_rejected_naming_the_field() -> TestResult {
    let mut system = UserSystem::start().await;
    let c = &mut system.client;
    let create = |name: &str, email: &str| pb::CreateUserRequest { name: name.into(), email: email.into() };
    assert_status(c.create_user(create("", "a@example.org")).await, Code::InvalidArgument, "name");
    assert_status(c.create_user(create("   ", "a@example.org")).await, Code::InvalidArgument, "name");
    assert_status(c.create_user(create(&"n".repeat(201), "a@example.org")).await, Code::InvalidArgument, "name");
    assert_status(c.create_user(create("Ann", "")).await, Code::InvalidArgument, "email");
    assert_status(c.create_user(create("Ann", "not-an-email")).await, Code::InvalidArgument, "email");
    assert_status(c.create_user(create("Ann", "ann@localhost")).await, Code::InvalidArgument, "email");
    let long_email = format!("{}@{}.org", "a".repeat(60), "b".repeat(200));
    assert_status(c.create_user(create("Ann", &long_email)).await, Code::InvalidArgument, "email");

    assert_status(c.get_user(pb::GetUserRequest { id: 0 }).await, Code::InvalidArgument, "id");
    assert_status(c.get_user(pb::GetUserRequest { id: -4 }).await, Code::InvalidArgument, "id");
    assert_status(c.delete_user(pb::DeleteUserRequest { id: 0 }).await, Code::InvalidArgument, "id");
    let update = |id, name: Option<&str>, email: Option<&str>| pb::UpdateUserRequest {
        id,
        name: name.map(Into::into),
        email: email.map(Into::into),
    };
    assert_status(c.update_user(update(-1, Some("x"), None)).await, Code::InvalidArgument, "id");
    assert_status(c.update_user(update(1, None, None)).await, Code::InvalidArgument, "nothing to update");
    assert_status(c.update_user(update(1, Some(""), None)).await, Code::InvalidArgument, "name");
    assert_status(c.update_user(update(1, None, Some("x@"))).await, Code::InvalidArgument, "email");

    let list = |page_size, token: &str| pb::ListUsersRequest { page_size, page_token: token.into() };
    assert_status(c.list_users(list(-1, "")).await, Code::InvalidArgument, "page_size");
    assert_status(c.list_users(list(1001, "")).await, Code::InvalidArgument, "page_size");
    assert_status(c.list_users(list(10, "garbage")).await, Code::InvalidArgument, "page_token");

    let users = sql_count(&system, "SELECT count(*) FROM users").await;
    assert_eq!(users, 0, "no rejected request wrote a row");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn missing_users_are_not_found() -> TestResult {
    let mut system = UserSystem::start().await;
    let c = &mut system.client;
    assert_status(c.get_user(pb::GetUserRequest { id: 424242 }).await, Code::NotFound, "user 424242 does not exist");
    let update = pb::UpdateUserRequest { id: 424242, name: Some("x".into()), email: None };
    assert_status(c.update_user(update).await, Code::NotFound, "424242");
    assert_status(c.delete_user(pb::DeleteUserRequest { id: 424242 }).await, Code::NotFound, "424242");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn emails_are_unique_whatever_their_case() -> TestResult {
    let mut system = UserSystem::start().await;
    system.create("Ada", "ada@example.org").await;
    let bob = system.create("Bob", "bob@example.org").await;
    let duplicate = pb::CreateUserRequest { name: "Other".into(), email: "ADA@Example.org".into() };
    assert_status(system.client.create_user(duplicate).await, Code::AlreadyExists, "ADA@Example.org");
    let steal = pb::UpdateUserRequest { id: bob.id, name: None, email: Some("Ada@example.org".into()) };
    assert_status(system.client.update_user(steal).await, Code::AlreadyExists, "already exists");
    let bob_now = system.client.get_user(pb::GetUserRequest { id: bob.id }).await?.into_inner();
    assert_eq!(bob_now, bob, "a refused update changes nothing");
    system.role.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_role_serves_health_reflection_and_metrics() -> TestResult {
    let mut system = UserSystem::start().await;
    // SERVING from the first moment the role answers: it probed its database before serving.
    let addr = system.role.addr.to_string();
    let status = msys::grpc::check_health(&addr, "", std::time::Duration::from_secs(3)).await?;
    assert_eq!(status, "SERVING");
    let status = msys::grpc::check_health(&addr, "msys.v1.UserService", std::time::Duration::from_secs(3)).await?;
    assert_eq!(status, "SERVING");
    system.create("Ada", "ada@example.org").await;

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(system.role.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await?.into_inner();
    let listed = format!("{:?}", responses.message().await?);
    for service in ["msys.v1.UserService", "grpc.health.v1.Health", "msys.v1.MetricsService"] {
        assert!(listed.contains(service), "reflection lists {service}: {listed}");
    }

    let mut metrics = pb::metrics_service_client::MetricsServiceClient::new(system.role.channel().await);
    let report = metrics.get_metrics(pb::GetMetricsRequest {}).await?.into_inner();
    assert_eq!(report.role, "user");
    let creates =
        report.methods.iter().find(|m| m.method == "/msys.v1.UserService/CreateUser").expect("CreateUser is measured");
    assert_eq!((creates.total, creates.ok, creates.failed), (1, 1, 0));
    system.role.stop().await;
    Ok(())
}

async fn sql_count(system: &UserSystem, query: &str) -> i64 {
    crate::support::sql(&system.db).await.query_one(query, &[]).await.expect("count").get(0)
}
