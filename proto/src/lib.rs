//! The gRPC contract of coinflow-fulfillment, generated at build time from `proto/`.
//!
//! `coinflow.fulfillment.v1` holds two services: `Ingest`, which the edge calls and any
//! internal service may implement, and `Fulfillment`, the query API.

/// Package `coinflow.fulfillment.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("coinflow.fulfillment.v1");
}

/// The encoded `FileDescriptorSet` of every file in the contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/coinflow_descriptor.bin"));
