//! The delivery log: each event Coinflow logged as not delivered is looked up in the
//! ledger by the transport identity the edge would give it, and, when missing, resent by
//! Coinflow (then waited for) or recorded directly.
//!
//! An identity that comes from the body's bytes (`b1:`: an event with no id, or a body
//! that is not an envelope) can only match when Coinflow logs the packet byte for byte as
//! it posted it; such an event is resent when not found, but not waited for, since what
//! arrives may be recorded under another identity (the ledger dedupes it as it always
//! does).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coinflow_shared::convert::from_body;
use coinflow_shared::proto::v1::{DeliverRequest, GetEventRequest, WebhookEvent};
use tokio::time::Instant;
use tonic::Code;

use super::report::{Action, Discrepancy, Out, Progress, Report};
use super::{Query, RecoverError, Recovery};
use crate::coinflow_api::{Delivery, Window};

/// How often the ledger is asked whether resent events arrived.
const POLL: Duration = Duration::from_millis(500);

/// One event the log holds, by its latest attempt.
struct Logged {
    delivery: Delivery,
    event: WebhookEvent,
}

impl Logged {
    fn action(&self, action: &'static str) -> Action<'_> {
        Action {
            action,
            event_key: Some(&self.event.event_key),
            delivery_id: Some(&self.delivery.id),
            event_type: Some(&self.delivery.event_type),
            payment_id: self.event.payment_id.as_deref(),
            ..Action::default()
        }
    }
}

pub(super) async fn sweep(
    r: &mut Recovery,
    window: Window,
    report: &mut Report,
    out: &mut Out,
) -> Result<(), RecoverError> {
    let deliveries = r.api.unacked_deliveries(window, None).await?;
    report.deliveries = deliveries.len();
    let mut events: BTreeMap<String, Logged> = BTreeMap::new();
    for delivery in deliveries {
        let packet = Bytes::copy_from_slice(delivery.data.get().as_bytes());
        let event = from_body(packet, SystemTime::now());
        match events.entry(event.event_key.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(Logged { delivery, event });
            }
            Entry::Occupied(mut slot) => {
                if delivery.sent_at() > slot.get().delivery.sent_at() {
                    slot.insert(Logged { delivery, event });
                }
            }
        }
    }
    report.events = events.len();
    let progress = Progress::new("events", events.len());
    let mut resent = Vec::new();
    for (i, (key, logged)) in events.into_iter().enumerate() {
        progress.show(i);
        if recorded(&mut r.query, &key).await? {
            report.already_recorded += 1;
            out.write(&logged.action("already_recorded"))?;
        } else if r.args.direct {
            let ack = r
                .ingest
                .deliver(DeliverRequest {
                    event: Some(logged.event.clone()),
                })
                .await?
                .into_inner();
            if ack.duplicate {
                report.already_recorded += 1;
                out.write(&logged.action("already_recorded"))?;
            } else {
                report.recorded_directly += 1;
                out.write(&logged.action("recorded_directly"))?;
            }
        } else {
            r.api.resend(&logged.delivery.id).await?;
            report.resent += 1;
            out.write(&logged.action("resent"))?;
            if key.starts_with("t1:") {
                resent.push(logged);
            } else {
                report.resent_unverifiable += 1;
            }
        }
    }
    progress.done();
    let waited = wait_for(&mut r.query, resent, r.args.wait).await?;
    report.resent_recorded += waited.recorded;
    for logged in waited.missing {
        out.write(&logged.action("resent_not_recorded"))?;
        report.discrepancies.push(Discrepancy::ResentNotRecorded {
            event_key: logged.event.event_key,
            delivery_id: logged.delivery.id,
            event_type: logged.delivery.event_type,
            payment_id: logged.event.payment_id,
        });
    }
    Ok(())
}

/// Whether the ledger holds the event `event_key`.
async fn recorded(query: &mut Query, event_key: &str) -> Result<bool, RecoverError> {
    let request = GetEventRequest {
        event_key: event_key.to_owned(),
    };
    match query.get_event(request).await {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(status.into()),
    }
}

struct Waited {
    recorded: usize,
    missing: Vec<Logged>,
}

/// Polls the ledger until every resent event is recorded or `wait` is over.
async fn wait_for(
    query: &mut Query,
    mut waiting: Vec<Logged>,
    wait: Duration,
) -> Result<Waited, RecoverError> {
    let deadline = Instant::now() + wait;
    let mut recorded_count = 0;
    loop {
        let mut missing = Vec::with_capacity(waiting.len());
        for logged in waiting {
            if recorded(query, &logged.event.event_key).await? {
                recorded_count += 1;
            } else {
                missing.push(logged);
            }
        }
        waiting = missing;
        let now = Instant::now();
        if waiting.is_empty() || now >= deadline {
            return Ok(Waited {
                recorded: recorded_count,
                missing: waiting,
            });
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}
