//! coinflow-sender: delivers webhooks the way Coinflow does, so merchants can test without
//! the dashboard and this project's tests and benchmark have a faithful client.
//!
//! - [`schedule`]: Coinflow's retry schedule (16 attempts, waits doubling from 1 s to about
//!   9 h), compressible in time.
//! - [`deliver`]: signs each attempt (`Coinflow-Signature`, and `Authorization` when
//!   enabled), gives up on an attempt after 5 s, treats only 200 as success, records every
//!   attempt's latency and status, and writes a delivery log.
//! - [`generate`]: realistic traffic (a mix of event types over distinct payments, with
//!   chosen duplicate and reordering ratios), seeded and reproducible.
//! - [`progress`]: count, rate, errors and ETA of a long run on stderr: a bar on a
//!   terminal, a plain line every few seconds elsewhere.
//! - [`chart`]: `coinflow-bench`'s rows as a JSON report and an SVG chart.
//! - [`standin`]: a local stand-in for Coinflow: delivers generated payments, keeps a log of
//!   every attempt, and serves Coinflow's merchant API (delivery log, resend, payments,
//!   refunds, chargebacks) over it.

pub mod chart;
pub mod deliver;
pub mod generate;
pub mod progress;
pub mod schedule;
pub mod standin;
