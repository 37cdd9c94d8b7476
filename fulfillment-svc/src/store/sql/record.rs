//! Recording webhook events through sqlx: what PostgreSQL's group commit
//! ([`super::pg_batch`]) runs for a batch, and a single event's transaction. SQLite records
//! webhook events on its own writer thread ([`crate::store::sqlite_writer`]); the ledger
//! append here also serves reviews on both backends.

use std::collections::HashMap;
use std::time::SystemTime;

use coinflow_shared::proto::v1::{LedgerEntry, Outcome, WebhookEvent};
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Core, classify, fetch_in, ledger_entries, with_rows};
use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan};
use crate::store::reconcile::{Delta, Held, Stored, apply};
use crate::store::{
    Ack, EventDetail, StoreError, actor, micros, origin, outcome_from_name, outcome_name,
};

/// The stored outcome of each event key listed: `IN ($1, ...)`.
const EXISTING_EVENTS: &str =
    "SELECT event_key, outcome, held_reason FROM events WHERE event_key IN";
/// The facts of each listed payment's events: `IN ($1, ...)`.
pub(super) const EVENT_FACTS: &str = "SELECT payment_id, event_type, refund_status, \
     chargeback_id FROM events WHERE payment_id IN";
/// Each listed payment's review: `IN ($1, ...)`.
pub(super) const REVIEWS: &str = "SELECT payment_id, decision FROM reviews WHERE payment_id IN";
/// Each listed payment's plan: `IN ($1, ...)`.
pub(super) const PLANS: &str = "SELECT payment_id, item, catalog_version, grants, wallet, \
     raw_customer_id FROM plans WHERE payment_id IN";
/// What each listed payment's entries add up to per sku: `IN ($1, ...)`, then
/// [`PAYMENT_SUMS_TAIL`].
const PAYMENT_SUMS: &str = "SELECT payment_id, sku, CAST(SUM(quantity) AS BIGINT) FROM ledger \
     WHERE kind IN ('grant', 'revoke', 'restore') AND payment_id IN";
const PAYMENT_SUMS_TAIL: &str = "GROUP BY payment_id, sku";
/// Events, one row of 15 values each.
const INSERT_EVENTS: &str = "INSERT INTO events (event_key, event_type, category, created_raw, \
     payment_id, wallet, raw_customer_id, refund_status, chargeback_id, outcome, held_reason, \
     received_at_us, recorded_at_us, raw_body, origin) VALUES";
const EVENT_VALUES: usize = 15;
/// Plans, one row of 8 values each.
const INSERT_PLANS: &str = "INSERT INTO plans (payment_id, source, item, catalog_version, \
     grants, wallet, raw_customer_id, recorded_at_us) VALUES";
const PLAN_VALUES: usize = 8;
/// Ledger entries of payments, one row of 13 values each (the payment, its entry's offset
/// after the payment's last `entry_no`, then the entry's columns), then
/// [`INSERT_ENTRIES_TAIL`]. Every row's number is read before any is inserted.
const INSERT_ENTRIES: &str = "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, \
     wallet, raw_customer_id, item, catalog_version, event_key, actor, note, recorded_at_us) \
     SELECT v.column1, \
       (SELECT COALESCE(MAX(l.entry_no), 0) FROM ledger l WHERE l.payment_id = v.column1) \
         + v.column2, \
       v.column3, v.column4, v.column5, v.column6, v.column7, v.column8, v.column9, \
       v.column10, v.column11, v.column12, v.column13 \
     FROM (VALUES";
const INSERT_ENTRIES_TAIL: &str = concat!(") AS v RETURNING ", ledger_columns!());
const ENTRY_VALUES: usize = 13;

/// An event recorded up to its ledger entries.
pub(super) struct Prepared {
    ack: Ack,
    append: Option<(GrantPlan, Vec<Delta>)>,
    event_key: String,
    actor: &'static str,
    now: i64,
}

impl Prepared {
    fn done(ack: Ack) -> Self {
        Self {
            ack,
            append: None,
            event_key: String::new(),
            actor: "coinflow",
            now: 0,
        }
    }
}

/// One payment's entries for [`Core::append_many`].
pub(super) struct Appending<'a> {
    pub(super) plan: &'a GrantPlan,
    pub(super) deltas: &'a [Delta],
    pub(super) cause: &'a Cause<'a>,
    pub(super) now: i64,
}

/// Who wrote an entry, and why.
pub(super) struct Cause<'a> {
    pub(super) event_key: Option<&'a str>,
    pub(super) actor: &'a str,
    pub(super) note: Option<&'a str>,
}

impl Core {
    /// Records one event in its own transaction (a batch's events, after the batch failed).
    pub(super) async fn record_once(
        &self,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        if let Some(payment_id) = &event.payment_id {
            self.lock(&mut tx, &[payment_id]).await?;
        }
        let prepared = self.prepare(&mut tx, &[(event, decision)]).await?;
        let mut acks = self.finish(&mut tx, prepared).await?;
        let ack = acks
            .pop()
            .ok_or_else(|| StoreError::Setup("recording an event returned no ack".into()))?;
        tx.commit().await.map_err(classify)?;
        self.notify(&ack.entries);
        Ok(ack)
    }

    /// Records events up to their ledger entries, with a few statements for all of them:
    /// their payments' locks must be held already, and no two may share a payment or an
    /// event key.
    pub(super) async fn prepare(
        &self,
        tx: &mut AnyConnection,
        events: &[(&WebhookEvent, &Decision)],
    ) -> Result<Vec<Prepared>, StoreError> {
        let keys: Vec<&str> = events.iter().map(|(e, _)| e.event_key.as_str()).collect();
        let mut existing: HashMap<String, (String, Option<String>)> = HashMap::new();
        for row in fetch_in(tx, EXISTING_EVENTS, &keys, "").await? {
            existing.insert(
                row.try_get(0).map_err(classify)?,
                (
                    row.try_get(1).map_err(classify)?,
                    row.try_get(2).map_err(classify)?,
                ),
            );
        }
        let payments: Vec<&str> = events
            .iter()
            .filter(|(e, _)| !existing.contains_key(&e.event_key))
            .filter_map(|(e, _)| e.payment_id.as_deref())
            .collect();
        let mut stored = load_stored(tx, &payments).await?;

        let now = micros(SystemTime::now());
        let mut prepared = Vec::with_capacity(events.len());
        let mut new_events = Vec::new();
        let mut new_plans = Vec::new();
        for &(event, decision) in events {
            if let Some((outcome, held_reason)) = existing.remove(&event.event_key) {
                prepared.push(Prepared::done(Ack {
                    outcome: outcome_from_name(&outcome),
                    held_reason,
                    duplicate: true,
                    entries: Vec::new(),
                    item: None,
                }));
                continue;
            }
            let payment = event
                .payment_id
                .as_ref()
                .map(|p| stored.remove(p).unwrap_or_default());
            let effect = apply(event, decision, payment, self.policy);
            new_events.push((event, effect.outcome, effect.held_reason));
            if effect.new_plan
                && let Some(plan) = &effect.plan
            {
                new_plans.push(plan.clone());
            }
            prepared.push(Prepared {
                ack: Ack {
                    outcome: effect.outcome,
                    held_reason: effect.held_reason.map(str::to_owned),
                    duplicate: false,
                    entries: Vec::new(),
                    item: effect.plan.as_ref().map(|plan| plan.item.clone()),
                },
                append: effect.plan.map(|plan| (plan, effect.deltas)),
                event_key: event.event_key.clone(),
                actor: actor(event),
                now,
            });
        }
        insert_events(tx, &new_events, now).await?;
        let new_plans: Vec<&GrantPlan> = new_plans.iter().collect();
        insert_plans(tx, &new_plans, "catalog", now).await?;
        Ok(prepared)
    }

    /// Appends what [`Core::prepare`] decided to the ledger (at most one prepared event
    /// per payment) and returns each event's ack.
    pub(super) async fn finish(
        &self,
        tx: &mut AnyConnection,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<Ack>, StoreError> {
        let causes: Vec<Cause<'_>> = prepared
            .iter()
            .map(|p| Cause {
                event_key: Some(&p.event_key),
                actor: p.actor,
                note: None,
            })
            .collect();
        let (owners, items): (Vec<usize>, Vec<Appending<'_>>) = prepared
            .iter()
            .zip(&causes)
            .enumerate()
            .filter_map(|(i, (p, cause))| {
                let (plan, deltas) = p.append.as_ref()?;
                Some((
                    i,
                    Appending {
                        plan,
                        deltas,
                        cause,
                        now: p.now,
                    },
                ))
            })
            .unzip();
        let written = self.append_many(tx, &items).await?;
        let mut acks: Vec<Ack> = prepared.into_iter().map(|p| p.ack).collect();
        for (i, entries) in owners.into_iter().zip(written) {
            acks[i].entries = entries;
        }
        Ok(acks)
    }

    /// Appends `deltas` for `plan`'s payment, numbered after its last entry.
    pub(super) async fn append(
        &self,
        conn: &mut AnyConnection,
        plan: &GrantPlan,
        deltas: &[Delta],
        cause: &Cause<'_>,
        now: i64,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut written = self
            .append_many(
                conn,
                &[Appending {
                    plan,
                    deltas,
                    cause,
                    now,
                }],
            )
            .await?;
        Ok(written.pop().unwrap_or_default())
    }

    /// Appends each item's deltas for its payment (at most one item per payment), in one
    /// statement, numbered after each payment's last entry; returns each item's entries.
    /// Takes the ledger-append lock first.
    pub(super) async fn append_many(
        &self,
        conn: &mut AnyConnection,
        items: &[Appending<'_>],
    ) -> Result<Vec<Vec<LedgerEntry>>, StoreError> {
        let mut written: Vec<Vec<LedgerEntry>> = items.iter().map(|_| Vec::new()).collect();
        let rows: usize = items.iter().map(|i| i.deltas.len()).sum();
        if rows == 0 {
            return Ok(written);
        }
        self.lock_appends(&mut *conn).await?;
        let sql = with_rows(INSERT_ENTRIES, rows, ENTRY_VALUES, INSERT_ENTRIES_TAIL);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for item in items {
            for (k, d) in (1_i64..).zip(item.deltas) {
                query = query
                    .bind(&item.plan.payment_id)
                    .bind(k)
                    .bind(d.kind.as_str())
                    .bind(&d.sku)
                    .bind(d.quantity)
                    .bind(&item.plan.wallet)
                    .bind(&item.plan.raw_customer_id)
                    .bind(&item.plan.item)
                    .bind(&item.plan.catalog_version)
                    .bind(item.cause.event_key)
                    .bind(item.cause.actor)
                    .bind(item.cause.note)
                    .bind(item.now);
            }
        }
        let rows = query.fetch_all(&mut *conn).await.map_err(classify)?;
        let mut entries = ledger_entries(&rows)?;
        entries.sort_by_key(|e| e.seq);
        for entry in entries {
            if let Some(i) = items
                .iter()
                .position(|i| i.plan.payment_id == entry.payment_id)
            {
                written[i].push(entry);
            }
        }
        Ok(written)
    }
}

/// What each of `payments` has on record: its events' facts, review, plan and ledger sums
/// (the default for a payment with nothing yet).
pub(super) async fn load_stored(
    conn: &mut AnyConnection,
    payments: &[&str],
) -> Result<HashMap<String, Stored>, StoreError> {
    let mut stored: HashMap<String, Stored> = payments
        .iter()
        .map(|p| ((*p).to_owned(), Stored::default()))
        .collect();
    fn entry<'s>(
        stored: &'s mut HashMap<String, Stored>,
        row: &sqlx::any::AnyRow,
    ) -> Result<&'s mut Stored, StoreError> {
        let payment: String = row.try_get(0).map_err(classify)?;
        Ok(stored.entry(payment).or_default())
    }
    for row in fetch_in(conn, EVENT_FACTS, payments, "").await? {
        let (t, detail) = event_fact(&row)?;
        let (t, status, chargeback) = detail.fact(&t);
        entry(&mut stored, &row)?.facts.add(t, status, chargeback);
    }
    for row in fetch_in(conn, REVIEWS, payments, "").await? {
        let decision: String = row.try_get(1).map_err(classify)?;
        entry(&mut stored, &row)?.rejected = decision == "rejected";
    }
    for row in fetch_in(conn, PLANS, payments, "").await? {
        let plan = plan_of(&row)?;
        entry(&mut stored, &row)?.plan = Some(plan);
    }
    for row in fetch_in(conn, PAYMENT_SUMS, payments, PAYMENT_SUMS_TAIL).await? {
        let (sku, net): (String, i64) = (
            row.try_get(1).map_err(classify)?,
            row.try_get(2).map_err(classify)?,
        );
        entry(&mut stored, &row)?
            .current
            .insert(sku, Held { net, touched: true });
    }
    Ok(stored)
}

/// A row of [`EVENT_FACTS`]: the event's type and detail.
pub(super) fn event_fact(row: &sqlx::any::AnyRow) -> Result<(String, EventDetail), StoreError> {
    Ok((
        row.try_get(1).map_err(classify)?,
        EventDetail {
            refund_status: row.try_get(2).map_err(classify)?,
            chargeback_id: row.try_get(3).map_err(classify)?,
        },
    ))
}

/// A row of [`PLANS`].
pub(super) fn plan_of(row: &sqlx::any::AnyRow) -> Result<GrantPlan, StoreError> {
    let payment_id: String = row.try_get(0).map_err(classify)?;
    let grants: String = row.try_get(3).map_err(classify)?;
    let grants: Vec<Grant> = serde_json::from_str(&grants)
        .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
    Ok(GrantPlan {
        item: row.try_get(1).map_err(classify)?,
        catalog_version: row.try_get(2).map_err(classify)?,
        grants,
        wallet: row.try_get(4).map_err(classify)?,
        raw_customer_id: row.try_get(5).map_err(classify)?,
        payment_id,
    })
}

/// Inserts `events` with their outcomes in one statement.
async fn insert_events(
    conn: &mut AnyConnection,
    events: &[(&WebhookEvent, Outcome, Option<&str>)],
    now: i64,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let sql = with_rows(INSERT_EVENTS, events.len(), EVENT_VALUES, "");
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for &(event, outcome, held_reason) in events {
        let received = event
            .received_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map_or(now, micros);
        query = query
            .bind(&event.event_key)
            .bind(&event.event_type)
            .bind(&event.category)
            .bind(&event.created_raw)
            .bind(&event.payment_id)
            .bind(&event.wallet)
            .bind(&event.raw_customer_id)
            .bind(&event.refund_status)
            .bind(&event.chargeback_id)
            .bind(outcome_name(outcome))
            .bind(held_reason)
            .bind(received)
            .bind(now)
            .bind(event.raw_body.to_vec())
            .bind(origin(event));
    }
    query.execute(&mut *conn).await.map_err(classify)?;
    Ok(())
}

/// Inserts `plans` in one statement.
pub(super) async fn insert_plans(
    conn: &mut AnyConnection,
    plans: &[&GrantPlan],
    source: &str,
    now: i64,
) -> Result<(), StoreError> {
    if plans.is_empty() {
        return Ok(());
    }
    let sql = with_rows(INSERT_PLANS, plans.len(), PLAN_VALUES, "");
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for plan in plans {
        let grants = serde_json::to_string(&plan.grants)
            .map_err(|e| StoreError::Setup(format!("encoding plan: {e}")))?;
        query = query
            .bind(&plan.payment_id)
            .bind(source)
            .bind(&plan.item)
            .bind(&plan.catalog_version)
            .bind(grants)
            .bind(&plan.wallet)
            .bind(&plan.raw_customer_id)
            .bind(now);
    }
    query.execute(&mut *conn).await.map_err(classify)?;
    Ok(())
}
