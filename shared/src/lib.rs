//! What both services share: the Coinflow v2 envelope, the one definition of an event's
//! identity, the `Coinflow-Signature` scheme, the conversion to the protobuf contract,
//! config, telemetry, and the HTTP accept loop and admin port.

pub mod admin;
pub mod config;
pub mod convert;
pub mod envelope;
pub mod http_server;
pub mod identity;
pub mod limits;
pub mod log_writer;
pub mod shutdown;
pub mod signature;
pub mod telemetry;

pub use coinflow_proto as proto;
