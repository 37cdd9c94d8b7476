//! What a review writes through sqlx on either backend: a payment's stored state, its
//! plan, and its ledger entries (the statements the reads share live here too). Webhook
//! events are recorded by each backend's own group-commit writer: SQLite's thread
//! ([`crate::store::sqlite_writer`]) and PostgreSQL's workers ([`super::pg_batch`]).

use std::collections::HashMap;

use coinflow_shared::proto::v1::LedgerEntry;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Core, classify, fetch_in, ledger_entries, with_rows};
use crate::catalog::Grant;
use crate::decision::GrantPlan;
use crate::store::reconcile::{Delta, Held, Stored};
use crate::store::{EventDetail, StoreError};

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
/// Plans, one row of 8 values each.
const INSERT_PLANS: &str = "INSERT INTO plans (payment_id, source, item, catalog_version, \
     grants, wallet, raw_customer_id, recorded_at_us) VALUES";
const PLAN_VALUES: usize = 8;
/// A payment's ledger entries, one row of 13 values each (the payment, its entry's offset
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

/// Who wrote an entry, and why.
pub(super) struct Cause<'a> {
    pub(super) event_key: Option<&'a str>,
    pub(super) actor: &'a str,
    pub(super) note: Option<&'a str>,
}

impl Core {
    /// Appends `deltas` for `plan`'s payment, numbered after its last entry, in one
    /// statement; takes the ledger-append lock first.
    pub(super) async fn append(
        &self,
        conn: &mut AnyConnection,
        plan: &GrantPlan,
        deltas: &[Delta],
        cause: &Cause<'_>,
        now: i64,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        if deltas.is_empty() {
            return Ok(Vec::new());
        }
        self.lock_appends(&mut *conn).await?;
        let sql = with_rows(
            INSERT_ENTRIES,
            deltas.len(),
            ENTRY_VALUES,
            INSERT_ENTRIES_TAIL,
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (k, d) in (1_i64..).zip(deltas) {
            query = query
                .bind(&plan.payment_id)
                .bind(k)
                .bind(d.kind.as_str())
                .bind(&d.sku)
                .bind(d.quantity)
                .bind(&plan.wallet)
                .bind(&plan.raw_customer_id)
                .bind(&plan.item)
                .bind(&plan.catalog_version)
                .bind(cause.event_key)
                .bind(cause.actor)
                .bind(cause.note)
                .bind(now);
        }
        let rows = query.fetch_all(&mut *conn).await.map_err(classify)?;
        let mut entries = ledger_entries(&rows)?;
        entries.sort_by_key(|e| e.seq);
        Ok(entries)
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
    plan_from(
        row.try_get(0).map_err(classify)?,
        row.try_get(1).map_err(classify)?,
        row.try_get(2).map_err(classify)?,
        &row.try_get::<String, _>(3).map_err(classify)?,
        row.try_get(4).map_err(classify)?,
        row.try_get(5).map_err(classify)?,
    )
}

/// A stored plan from its columns (`grants` is its JSON).
pub(super) fn plan_from(
    payment_id: String,
    item: String,
    catalog_version: String,
    grants: &str,
    wallet: String,
    raw_customer_id: Option<String>,
) -> Result<GrantPlan, StoreError> {
    let grants: Vec<Grant> = serde_json::from_str(grants)
        .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
    Ok(GrantPlan {
        payment_id,
        wallet,
        raw_customer_id,
        item,
        catalog_version,
        grants,
    })
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
