//! End-to-end tests: the real edge and fulfillment over real sockets, gRPC and SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod accounts;
mod api;
mod auth;
mod batching;
mod catalog_reload;
mod cli;
mod coinflow_api;
mod corpus;
mod deploy_observability;
mod durability;
mod faults;
mod fixtures;
mod grants;
mod grpc_surface;
mod lifecycle;
mod observability;
mod power_loss;
mod python_client;
mod recorded_or_retried;
mod recover;
mod review;
mod roles;
mod routes;
mod scale;
mod slow_clients;
mod statuses;
mod store;
mod stub;
