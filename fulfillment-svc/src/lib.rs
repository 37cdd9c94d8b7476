//! fulfillment-svc: turns Coinflow payment events into grants, exactly once per payment.
//!
//! An event arrives over gRPC ([`grpc::ingest`]), is decided purely from the event and the
//! [`catalog`] ([`decision`]), and is recorded with its grant in one durable transaction
//! ([`store`]). The query API ([`grpc::query`]) reads the ledger; a payment's state is
//! derived from the set of its events ([`lifecycle`]). [`server`] wires it together;
//! [`cli`] is the operator command line over the gRPC API; [`observe`] holds the spans
//! and metrics.

pub mod catalog;
pub mod cli;
pub mod coinflow_api;
pub mod config;
pub mod decision;
pub mod grpc;
pub mod lifecycle;
pub mod observe;
pub mod recover;
pub mod server;
pub mod store;

pub use config::Config;
pub use server::Server;
