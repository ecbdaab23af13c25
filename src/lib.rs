//! msys: users, orders, monitoring and a dashboard as one binary with one
//! role per subcommand. Each role is a library function taking its typed
//! settings and a shutdown token, so `main`, `msys all` and the tests start
//! them the same way.

pub mod all;
pub mod batch;
pub mod cli;
pub mod config;
pub mod db;
pub mod deadline;
pub mod error;
pub mod events;
pub mod frontend;
pub mod grpc;
pub mod kafka;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod migrate;
pub mod monitor;
pub mod order;
pub mod overload;
pub mod pb;
pub mod retention;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
pub mod user;
pub mod validate;
