//! Least privilege, as deployed on Kubernetes: the migration role migrates,
//! and the services log in as an application role that may read and write
//! rows but not change the schema.

use msys::{config::PostgresSettings, db, migrate, pb};

use crate::support::{
    TestResult, fresh_database, kafka_args, shared_broker, sql, start_user, unique, user_args, users_port,
};

#[tokio::test]
async fn user_role_starts_and_serves_as_a_dml_only_role_once_migrated() -> TestResult {
    let owner = fresh_database(users_port());
    db::ensure_database(&owner).await?;
    assert_eq!(migrate::run(&db::pool(&owner)?, migrate::USERS).await?, migrate::USERS.len());

    let app_role = unique("msys_app");
    let admin = sql(&owner).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_role} LOGIN PASSWORD 'app';
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             GRANT USAGE ON SCHEMA public TO {app_role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app_role};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app_role};"
        ))
        .await?;
    let app = PostgresSettings { user: app_role.clone(), password: Some("app".to_owned().into()), ..owner.clone() };
    let denied = sql(&app).await.batch_execute("CREATE TABLE not_allowed (id int)").await;
    assert!(denied.is_err(), "the application role must not be able to create tables");

    let kafka = kafka_args(&shared_broker(), &unique("user-events"));
    let role = start_user(user_args(&app, &kafka)).await;
    let mut users = pb::user_service_client::UserServiceClient::new(role.channel().await);
    let created = users
        .create_user(pb::CreateUserRequest { name: "Ada".into(), email: "ada@example.org".into() })
        .await?
        .into_inner();
    assert_eq!(created.name, "Ada");
    role.stop().await;
    admin.batch_execute(&format!("DROP OWNED BY {app_role}; DROP ROLE {app_role}")).await?;
    Ok(())
}
