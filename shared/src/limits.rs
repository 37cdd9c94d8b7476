//! The size limits both services agree on, so that no authentic delivery can make a call
//! that the other side refuses on every retry (see ARCHITECTURE.md, "Recorded or
//! retried").
//!
//! An event's encoded size is at most about twice its raw body (the body itself, plus the
//! fields read out of it) plus a bounded `webhookInfo`
//! ([`crate::convert::WEBHOOK_INFO_LIMITS`]); a `DeliverBatch` call holds events up to
//! [`MAX_BATCH_BYTES`] or a single event of any size. Both stay far below
//! [`MAX_GRPC_MESSAGE_BYTES`], which both sides set explicitly instead of tonic's 4 MiB
//! default.

/// The largest body the edge may be configured to accept (its default is 256 KiB; real
/// events are a few KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The encoded events one `DeliverBatch` call carries at most (one larger event goes
/// alone).
pub const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// The gRPC message limit, encoding and decoding, on the edge's client and on ingest.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

const _: () = assert!(2 * MAX_BODY_BYTES + MAX_BATCH_BYTES + 64 * 1024 < MAX_GRPC_MESSAGE_BYTES);
