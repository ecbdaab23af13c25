//! `msys all`: every implemented role in one process, each on its own port,
//! under one shutdown — one process to attach a debugger to, one log stream.

use clap::Args;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::user;

#[derive(Args, Debug, Clone)]
pub struct AllArgs {
    #[command(flatten)]
    pub user: user::UserArgs,
}

/// Runs the roles until `shutdown` or until one of them stops: a role that
/// fails takes the others down with it, so the process never limps on half
/// alive. Returns the first error.
pub async fn run(args: AllArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let root = shutdown.child_token();
    let user = {
        let token = root.child_token();
        let root = root.clone();
        tasks.spawn(async move {
            let result = user::run(args.user, token).await;
            report_exit("user", &result);
            root.cancel();
            result
        })
    };
    tasks.close();
    tasks.wait().await;
    user.await?
}

fn report_exit(role: &str, result: &anyhow::Result<()>) {
    match result {
        Ok(()) => tracing::info!(role, "role stopped"),
        Err(error) => {
            tracing::error!(role, error.message = %error, error.cause_chain = ?error, "role failed")
        }
    }
}
