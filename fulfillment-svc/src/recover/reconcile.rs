//! Coinflow's payments, refunds and chargebacks of the window against the ledger: each one
//! the ledger does not reflect is a discrepancy (a settled payment with no `Settled`
//! recorded, a refund or chargeback Coinflow has and the ledger does not). These are the
//! events no retry or resend can bring: their event type was not subscribed, or their
//! delivery left the log.

use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::{GetPaymentRequest, RecordedEvent};
use tonic::Code;

use super::report::{Action, Discrepancy, Out, Progress, Report};
use super::{Query, RecoverError, Recovery};
use crate::coinflow_api::{Window, epoch_millis};

pub(super) async fn reconcile(
    r: &mut Recovery,
    window: Window,
    report: &mut Report,
    out: &mut Out,
) -> Result<(), RecoverError> {
    let (since, until) = (epoch_millis(window.start), epoch_millis(window.end));
    let payments = r.api.payments(since, until).await?;
    report.payments = payments.len();
    let progress = Progress::new("payments", payments.len());
    for (i, payment) in payments.iter().enumerate() {
        progress.show(i);
        let events = recorded_events(&mut r.query, &payment.payment_id).await?;
        let settled = payment
            .status
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("Settled"));
        if settled && !events.iter().any(|e| e.event_type == "Settled") {
            found(
                report,
                out,
                Discrepancy::SettledNotRecorded {
                    payment_id: payment.payment_id.clone(),
                },
            )?;
        }
        let refunded = r
            .api
            .refunds(&payment.payment_id)
            .await?
            .iter()
            .any(|f| f.status.as_deref() != Some("Failed"));
        if refunded && !events.iter().any(|e| e.event_type.starts_with("Refund")) {
            found(
                report,
                out,
                Discrepancy::RefundNotRecorded {
                    payment_id: payment.payment_id.clone(),
                },
            )?;
        }
    }
    progress.done();
    for chargeback in r.api.chargebacks(since, until).await? {
        let events = recorded_events(&mut r.query, &chargeback.payment_id).await?;
        let status = chargeback.status.as_deref().unwrap_or("Opened");
        let reflected = events.iter().filter_map(dispute_of).any(|(outcome, id)| {
            chargeback
                .chargeback_id
                .as_deref()
                .is_none_or(|want| id.as_deref() == Some(want))
                && (status.eq_ignore_ascii_case("Opened") || outcome.eq_ignore_ascii_case(status))
        });
        if !reflected {
            found(
                report,
                out,
                Discrepancy::ChargebackNotRecorded {
                    payment_id: chargeback.payment_id.clone(),
                    chargeback_id: chargeback.chargeback_id.clone(),
                    status: status.to_owned(),
                },
            )?;
        }
    }
    Ok(())
}

fn found(report: &mut Report, out: &mut Out, d: Discrepancy) -> Result<(), RecoverError> {
    out.write(&Action {
        action: "discrepancy",
        discrepancy: Some(&d),
        ..Action::default()
    })?;
    report.discrepancies.push(d);
    Ok(())
}

/// The events the ledger holds for `payment_id` (none when it knows the payment not).
async fn recorded_events(
    query: &mut Query,
    payment_id: &str,
) -> Result<Vec<RecordedEvent>, RecoverError> {
    let request = GetPaymentRequest {
        payment_id: payment_id.to_owned(),
    };
    match query.get_payment(request).await {
        Ok(r) => Ok(r.into_inner().payment.map(|p| p.events).unwrap_or_default()),
        Err(status) if status.code() == Code::NotFound => Ok(Vec::new()),
        Err(status) => Err(status.into()),
    }
}

/// A recorded chargeback event's outcome (`Opened`, `Won`, `Lost`) and `chargebackId`.
fn dispute_of(event: &RecordedEvent) -> Option<(&str, Option<String>)> {
    let (_, outcome) = event.event_type.split_once(" Chargeback ")?;
    let id = Envelope::parse(&event.raw_body)
        .ok()
        .and_then(|e| e.data.str("chargebackId").map(str::to_owned));
    Some((outcome, id))
}
