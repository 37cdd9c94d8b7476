//! webhook-edge: a stateless hyper server that authenticates Coinflow webhooks and hands
//! each one to fulfillment over gRPC, answering 200 only after fulfillment has durably
//! recorded it.
//!
//! A request passes the tower [`stack`] ([`observe`]: span and metrics; load shedding,
//! concurrency limit, timeouts, body limit), then the [`webhook`] route: [`auth`], parse, convert, and
//! deliver through [`client`]. Every answer comes from [`response`]. [`admin`] is the
//! readiness check behind the shared admin port; [`server`] wires it together over the
//! shared accept loop. The edge never touches storage.

pub mod admin;
pub mod auth;
pub mod client;
pub mod config;
pub mod observe;
pub mod response;
pub mod routes;
pub mod server;
pub mod stack;
pub mod webhook;

pub use config::Config;
pub use server::Edge;
