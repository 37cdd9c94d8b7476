//! The `Fulfillment` API for the merchant's internal services: entitlements, payments, the
//! ledger (paged and streamed), consumption, and the review queue.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coinflow_shared::convert::{to_proto, unparseable};
use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::fulfillment_server::Fulfillment;
use coinflow_shared::proto::v1::resolve_held_request::Resolution as ResolutionField;
use coinflow_shared::proto::v1::{
    self as pb, ConsumeRequest, ConsumeResponse, Entitlement, GetEntitlementsRequest,
    GetEntitlementsResponse, GetEventRequest, GetEventResponse, GetPaymentRequest,
    GetPaymentResponse, LedgerEntry, ListHeldRequest, ListHeldResponse, ListLedgerRequest,
    ListLedgerResponse, Outcome, Payment, RecordedEvent, ResolveHeldRequest, ResolveHeldResponse,
    WatchEntitlementsRequest,
};
use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::invalid;
use crate::catalog::CatalogHandle;
use crate::decision::approval_plan;
use crate::lifecycle::Facts;
use crate::observe::Metrics;
use crate::store::{LedgerFilter, Payer, Resolution, Spend, Store, micros};

/// How often a watch re-reads the ledger when no local commit woke it (commits made by
/// other replicas sharing the database).
const WATCH_POLL: Duration = Duration::from_secs(1);
/// Entries a watch reads per query.
const WATCH_BATCH: u32 = 500;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Held payments per `ListHeld` page at most: each carries its raw payload (up to the
/// edge's body limit).
const MAX_HELD_PAGE: u32 = 100;
/// The raw payloads one `ListHeld` page carries at most (a page always has at least one),
/// so a response stays within a client's default 4 MiB message limit.
const MAX_HELD_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The query service.
pub struct QueryService {
    store: Arc<dyn Store>,
    catalog: Arc<CatalogHandle>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    watches: Arc<Semaphore>,
}

impl QueryService {
    /// Serves over `store`; at most `max_watches` watch streams at once, which end when
    /// `shutdown` is cancelled.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<CatalogHandle>,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
        max_watches: usize,
    ) -> Self {
        Self {
            store,
            catalog,
            shutdown,
            metrics,
            watches: Arc::new(Semaphore::new(max_watches)),
        }
    }
}

fn payer(p: Option<pb::Payer>, field: &str) -> Result<Payer, Status> {
    match p.and_then(|p| p.id) {
        Some(pb::payer::Id::Wallet(w)) if !w.is_empty() => Ok(Payer::Wallet(w)),
        Some(pb::payer::Id::RawCustomerId(c)) if !c.is_empty() => Ok(Payer::RawCustomerId(c)),
        _ => Err(invalid(field, "set a non-empty wallet or raw_customer_id")),
    }
}

fn page_size(requested: u32, max: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE.min(max),
        n => n.min(max),
    }
}

fn decode_token(token: &str) -> Result<Option<i64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix("v1:")
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            invalid(
                "page_token",
                "pass the next_page_token of the previous page unchanged",
            )
        })
}

fn encode_token(seq: i64) -> String {
    format!("v1:{seq}")
}

fn micros_of(t: Option<prost_types::Timestamp>, field: &str) -> Result<Option<i64>, Status> {
    t.map(|t| {
        SystemTime::try_from(t)
            .map(micros)
            .map_err(|_| invalid(field, "a valid timestamp after 1970"))
    })
    .transpose()
}

type EntryStream = Pin<Box<dyn Stream<Item = Result<LedgerEntry, Status>> + Send>>;

#[tonic::async_trait]
impl Fulfillment for QueryService {
    async fn get_entitlements(
        &self,
        request: Request<GetEntitlementsRequest>,
    ) -> Result<Response<GetEntitlementsResponse>, Status> {
        let payer = payer(request.into_inner().payer, "payer")?;
        let entitlements = self
            .store
            .entitlements(&payer)
            .await?
            .into_iter()
            .map(|(sku, quantity)| Entitlement {
                sku,
                quantity,
                debt: quantity < 0,
            })
            .collect();
        Ok(Response::new(GetEntitlementsResponse { entitlements }))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        let payment_id = request.into_inner().payment_id;
        if payment_id.is_empty() {
            return Err(invalid("payment_id", "required"));
        }
        let record = self.store.payment(&payment_id).await?.ok_or_else(|| {
            Status::not_found(format!("no events recorded for payment {payment_id:?}"))
        })?;
        let facts = Facts::of(record.events.iter().map(|(e, d)| d.fact(&e.event_type)));
        let held_reason = if record.planned || record.review.is_some() {
            None
        } else {
            record
                .events
                .iter()
                .find(|(e, _)| e.outcome == i32::from(Outcome::Held))
                .and_then(|(e, _)| e.held_reason.clone())
        };
        // A Version 3 payment names its payer by customer id only (its wallet is empty).
        let payer = record
            .ledger
            .iter()
            .find(|l| !l.wallet.is_empty() || l.raw_customer_id.is_some());
        Ok(Response::new(GetPaymentResponse {
            payment: Some(Payment {
                payment_id,
                state: facts.state().as_str().to_owned(),
                held_reason,
                wallet: payer.map(|l| l.wallet.clone()).filter(|w| !w.is_empty()),
                raw_customer_id: payer.and_then(|l| l.raw_customer_id.clone()),
                events: record.events.into_iter().map(|(e, _)| e).collect(),
                ledger: record.ledger,
                review: record.review,
            }),
        }))
    }

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<GetEventResponse>, Status> {
        let event_key = request.into_inner().event_key;
        if event_key.is_empty() {
            return Err(invalid(
                "event_key",
                "required: the event's transport identity",
            ));
        }
        let (event, payment_id) =
            self.store.event(&event_key).await?.ok_or_else(|| {
                Status::not_found(format!("no event recorded under {event_key:?}"))
            })?;
        Ok(Response::new(GetEventResponse {
            event: Some(event),
            payment_id,
        }))
    }

    async fn list_ledger(
        &self,
        request: Request<ListLedgerRequest>,
    ) -> Result<Response<ListLedgerResponse>, Status> {
        let r = request.into_inner();
        let filter = LedgerFilter {
            payer: r.payer.map(|p| payer(Some(p), "payer")).transpose()?,
            payment_id: r.payment_id.filter(|p| !p.is_empty()),
            sku: r.sku.filter(|s| !s.is_empty()),
            since_us: micros_of(r.since, "since")?,
            until_us: micros_of(r.until, "until")?,
        };
        let limit = page_size(r.page_size, MAX_PAGE);
        let before = decode_token(&r.page_token)?;
        let entries = self.store.list_ledger(&filter, before, limit).await?;
        let next_page_token = match entries.last() {
            Some(last) if entries.len() == limit as usize => encode_token(last.seq),
            _ => String::new(),
        };
        Ok(Response::new(ListLedgerResponse {
            entries,
            next_page_token,
        }))
    }

    type WatchEntitlementsStream = EntryStream;

    async fn watch_entitlements(
        &self,
        request: Request<WatchEntitlementsRequest>,
    ) -> Result<Response<EntryStream>, Status> {
        let r = request.into_inner();
        let payer = r.payer.map(|p| payer(Some(p), "payer")).transpose()?;
        if r.after_seq < 0 {
            return Err(invalid(
                "after_seq",
                "0 or the seq of the last entry received",
            ));
        }
        let permit = Arc::clone(&self.watches).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(
                "too many WatchEntitlements streams on this replica; retry with backoff",
            )
        })?;
        let (tx, rx) = mpsc::channel(WATCH_BATCH as usize);
        let (store, shutdown) = (Arc::clone(&self.store), self.shutdown.clone());
        let mut commits = store.commits();
        let mut after = r.after_seq;
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                commits.mark_unchanged();
                let batch = match store
                    .entries_after(payer.as_ref(), after, WATCH_BATCH)
                    .await
                {
                    Ok(batch) => batch,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let full = batch.len() == WATCH_BATCH as usize;
                for entry in batch {
                    after = entry.seq;
                    if tx.send(Ok(entry)).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    _ = commits.changed() => {}
                    () = tokio::time::sleep(WATCH_POLL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn consume(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<ConsumeResponse>, Status> {
        let r = request.into_inner();
        let spend = Spend {
            payer: payer(r.payer, "payer")?,
            sku: r.sku,
            quantity: r.quantity,
            idempotency_key: r.idempotency_key,
        };
        if spend.quantity <= 0 {
            return Err(invalid("quantity", "a positive number"));
        }
        if spend.idempotency_key.is_empty() {
            return Err(invalid(
                "idempotency_key",
                "required: your id for this spend",
            ));
        }
        if !self.catalog.current().is_consumable(&spend.sku) {
            return Err(Status::failed_precondition(format!(
                "sku {:?} is not consumable: mark it `[skus.{}] consumable = true` in the catalog",
                spend.sku, spend.sku
            )));
        }
        let spent = self.store.consume(&spend).await?;
        if !spent.duplicate {
            self.metrics
                .count_entries(std::slice::from_ref(&spent.entry));
        }
        Ok(Response::new(ConsumeResponse {
            entry: Some(spent.entry),
            balance: spent.balance,
            duplicate: spent.duplicate,
        }))
    }

    async fn list_held(
        &self,
        request: Request<ListHeldRequest>,
    ) -> Result<Response<ListHeldResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size, MAX_HELD_PAGE);
        let after = decode_token(&r.page_token)?.unwrap_or(0);
        let mut held = self.store.list_held(after, limit).await?;
        let full = held.len() == limit as usize;
        let mut bytes = 0;
        let fits = held
            .iter()
            .position(|h| {
                bytes += h.event.raw_body.len();
                bytes > MAX_HELD_PAGE_BYTES
            })
            .map_or(held.len(), |over| over.max(1));
        let truncated = fits < held.len();
        held.truncate(fits);
        let next_page_token = match held.last() {
            Some(last) if full || truncated => encode_token(last.seq),
            _ => String::new(),
        };
        let held = held
            .into_iter()
            .map(|h| pb::HeldPayment {
                state: Facts::of(h.event_types.iter().map(|(t, d)| d.fact(t)))
                    .state()
                    .as_str()
                    .to_owned(),
                held_reason: h.event.held_reason.clone().unwrap_or_default(),
                payment_id: h.payment_id,
                wallet: h.wallet,
                raw_customer_id: h.raw_customer_id,
                event: Some(h.event),
            })
            .collect();
        Ok(Response::new(ListHeldResponse {
            held,
            next_page_token,
        }))
    }

    async fn resolve_held(
        &self,
        request: Request<ResolveHeldRequest>,
    ) -> Result<Response<ResolveHeldResponse>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let operator = operator(caller.as_ref(), r.operator.trim())?;
        if r.payment_id.is_empty() {
            return Err(invalid("payment_id", "required"));
        }
        let resolution = r
            .resolution
            .ok_or_else(|| invalid("resolution", "set approve or reject"))?;
        let record = self.store.payment(&r.payment_id).await?.ok_or_else(|| {
            Status::not_found(format!("no events recorded for payment {:?}", r.payment_id))
        })?;
        let wanted = match &resolution {
            ResolutionField::Approve(_) => "approved",
            ResolutionField::Reject(_) => "rejected",
        };
        if record.review.as_deref() == Some(wanted) {
            return Ok(Response::new(ResolveHeldResponse {
                review: wanted.to_owned(),
                entries: Vec::new(),
                duplicate: true,
            }));
        }
        let held = record
            .events
            .iter()
            .map(|(e, _)| e)
            .find(|e| e.outcome == i32::from(Outcome::Held))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "payment {:?} is not held for review",
                    r.payment_id
                ))
            })?;
        let event = held_event(held);
        let resolution = match resolution {
            ResolutionField::Approve(a) => Resolution::Approve(
                approval_plan(&event, &self.catalog.current(), a.item.as_deref())
                    .map_err(Status::failed_precondition)?,
            ),
            ResolutionField::Reject(_) => Resolution::Reject {
                wallet: event.wallet.clone().unwrap_or_default(),
                raw_customer_id: event.raw_customer_id.clone(),
            },
        };
        let resolved = self
            .store
            .resolve(&r.payment_id, &resolution, &operator, &r.note)
            .await?;
        self.metrics.count_entries(&resolved.entries);
        tracing::info!(
            payment_id = %r.payment_id,
            review = %resolved.review,
            operator = %operator,
            entries = resolved.entries.len(),
            "held payment resolved"
        );
        Ok(Response::new(ResolveHeldResponse {
            review: resolved.review,
            entries: resolved.entries,
            duplicate: resolved.duplicate,
        }))
    }
}

/// Who resolves: the operator the credential names. A request naming someone else is
/// refused; without credentials (local mode) the request's name is recorded as
/// unverified.
fn operator(caller: Option<&Caller>, named: &str) -> Result<String, Status> {
    match caller {
        Some(Caller::Credential {
            name: Some(name), ..
        }) => {
            if named.is_empty() || named == &**name {
                Ok(name.to_string())
            } else {
                Err(Status::permission_denied(format!(
                    "this credential belongs to operator {name:?}, not {named:?}: leave \
                     `operator` empty or name yourself"
                )))
            }
        }
        Some(Caller::Unauthenticated) if !named.is_empty() => Ok(format!("unverified:{named}")),
        Some(Caller::Unauthenticated) => Err(invalid(
            "operator",
            "required without credentials: who is deciding (recorded as unverified)",
        )),
        _ => Err(Status::permission_denied(
            "resolving needs an operator credential",
        )),
    }
}

/// The held event as the edge delivered it, rebuilt from its exact raw body.
fn held_event(held: &RecordedEvent) -> pb::WebhookEvent {
    let raw = Bytes::clone(&held.raw_body);
    match Envelope::parse(&held.raw_body) {
        Ok(envelope) => to_proto(envelope, raw, SystemTime::now()),
        Err(e) => unparseable(raw, e.to_string(), SystemTime::now()),
    }
}
