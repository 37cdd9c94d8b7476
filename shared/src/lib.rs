//! What both services share: the Coinflow v2 envelope, the one definition of an event's
//! identity, the `Coinflow-Signature` scheme, the conversion to the protobuf contract,
//! and the config and telemetry helpers.

pub mod config;
pub mod convert;
pub mod envelope;
pub mod identity;
pub mod shutdown;
pub mod signature;
pub mod telemetry;

pub use coinflow_proto as proto;
