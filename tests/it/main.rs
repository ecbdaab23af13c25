//! Integration tests against real PostgreSQL and a real Kafka-protocol
//! broker (started by `scripts/test.sh`). One binary, so the suite links
//! once and tests share the support module.

mod dashboard_load;
mod hardening;
mod least_privilege;
mod load;
mod load_monitor;
mod load_scenarios;
mod monitor;
mod order_failover;
mod order_flow;
mod order_pipeline;
mod order_replica;
mod outbox_failover;
mod shutdown;
mod support;
mod telemetry_metrics;
mod telemetry_traces;
mod user_api;
mod user_batching;
mod user_events;
mod user_faults;
mod user_wait;
