//! The reads: entitlements, a payment's record, the ledger (paged and after a cursor) and
//! the review queue. They run on the read pool.

use std::collections::HashMap;

use coinflow_shared::proto::v1::{LedgerEntry, RecordedEvent};
use sqlx::Row;

use super::record::{EVENT_FACTS, PLANS, REVIEWS, event_fact, plan_of};
use super::{Core, account_binds, classify, fetch_in, ledger_entries, recorded_event};
use crate::store::{EventDetail, HeldPayment, LedgerFilter, Payer, PaymentRecord, StoreError};

/// The first held event of each payment still waiting for review (no plan, no review).
/// `h.outcome = e.outcome` (not `= 'held'`) keeps SQLite on `events_by_payment` for the
/// inner lookup: through the partial index `events_held` it scanned every held event for
/// each one, which made the queue gauge quadratic in the queue's size.
macro_rules! held {
    () => {
        "e.outcome = 'held' AND e.payment_id IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM events h WHERE h.payment_id = e.payment_id \
             AND h.outcome = e.outcome AND h.seq < e.seq) \
         AND NOT EXISTS (SELECT 1 FROM plans p WHERE p.payment_id = e.payment_id) \
         AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.payment_id = e.payment_id)"
    };
}

/// The optional filters of a ledger page, after its access path: `$3` sku, `$4` recorded at
/// or after, `$5` recorded before, `$6` `seq` below (the cursor), each `NULL` for none;
/// `$7` the page size. Newest first.
macro_rules! page_filters {
    () => {
        " AND ($3 IS NULL OR sku = $3) AND ($4 IS NULL OR recorded_at_us >= $4) \
         AND ($5 IS NULL OR recorded_at_us < $5) AND ($6 IS NULL OR seq < $6) \
         ORDER BY seq DESC LIMIT $7"
    };
}

/// The net quantity per sku of the account of `$1`, `$2` ([`account!`]).
pub(super) const ENTITLEMENTS: &str = concat!(
    account!(),
    "SELECT sku, CAST(SUM(quantity) AS BIGINT) FROM ledger WHERE ",
    of_account!(),
    " GROUP BY sku HAVING SUM(quantity) <> 0 ORDER BY sku"
);
/// A payment's events, in the order recorded.
const PAYMENT_EVENTS: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE payment_id = $1 ORDER BY seq"
);
/// One event by its transport identity.
const EVENT_BY_KEY: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events WHERE event_key = $1"
);
/// A payment's ledger entries, in the order recorded.
const PAYMENT_ENTRIES: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE payment_id = $1 ORDER BY seq"
);
/// A ledger page over every entry ([`page_filters!`]; `$1`, `$2` unused).
const PAGE: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE 1 = 1",
    page_filters!()
);
/// A ledger page of the account of `$1`, `$2` ([`account!`]), through the payer indexes.
pub(super) const PAGE_OF_ACCOUNT: &str = concat!(
    account!(),
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE ",
    of_account!(),
    page_filters!()
);
/// A ledger page of one payment (`$8`), through `ledger_by_payment`, and of the account of
/// `$1`, `$2` too when `$2` is set.
pub(super) const PAGE_OF_PAYMENT: &str = concat!(
    account!(),
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE payment_id = $8 AND ($2 IS NULL OR ",
    in_account!(),
    ")",
    page_filters!()
);
/// Entries after a `seq` (`$3`), oldest first, at most `$4`.
const AFTER: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE seq > $3 ORDER BY seq LIMIT $4"
);
/// [`AFTER`], of the account of `$1`, `$2` ([`account!`]).
pub(super) const AFTER_OF_ACCOUNT: &str = concat!(
    account!(),
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE ",
    of_account!(),
    " AND seq > $3 ORDER BY seq LIMIT $4"
);
/// A page of the review queue: held events after `$1`, at most `$2`.
const HELD_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM events e WHERE ",
    held!(),
    " AND e.seq > $1 ORDER BY e.seq LIMIT $2"
);
/// How many payments wait for review, and the oldest one's arrival.
pub(super) const HELD_SUMMARY: &str = concat!(
    "SELECT CAST(COUNT(*) AS BIGINT), MIN(e.received_at_us) FROM events e WHERE ",
    held!()
);

impl Core {
    pub(super) async fn entitlements(
        &self,
        payer: &Payer,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let (kind, id) = account_binds(payer);
        sqlx::query_as(ENTITLEMENTS)
            .bind(kind)
            .bind(id)
            .fetch_all(&self.read)
            .await
            .map_err(classify)
    }

    pub(super) async fn event(
        &self,
        event_key: &str,
    ) -> Result<Option<(RecordedEvent, Option<String>)>, StoreError> {
        let row = sqlx::query(EVENT_BY_KEY)
            .bind(event_key)
            .fetch_optional(&self.read)
            .await
            .map_err(classify)?;
        row.map(|row| Ok((recorded_event(&row)?, row.try_get(10)?)))
            .transpose()
            .map_err(classify)
    }

    pub(super) async fn payment(
        &self,
        payment_id: &str,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let mut conn = self.read.acquire().await.map_err(classify)?;
        let rows = sqlx::query(PAYMENT_EVENTS)
            .bind(payment_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
        if rows.is_empty() {
            return Ok(None);
        }
        let events = rows
            .iter()
            .map(|row| {
                let detail = EventDetail {
                    refund_status: row.try_get(8)?,
                    chargeback_id: row.try_get(13)?,
                };
                Ok((recorded_event(row)?, detail))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(classify)?;
        let rows = sqlx::query(PAYMENT_ENTRIES)
            .bind(payment_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
        let ledger = ledger_entries(&rows)?;
        let review = match fetch_in(&mut conn, REVIEWS, &[payment_id], "")
            .await?
            .first()
        {
            Some(row) => Some(row.try_get(1).map_err(classify)?),
            None => None,
        };
        let planned = match fetch_in(&mut conn, PLANS, &[payment_id], "").await?.first() {
            Some(row) => plan_of(row).map(|_| true)?,
            None => false,
        };
        Ok(Some(PaymentRecord {
            events,
            ledger,
            review,
            planned,
        }))
    }

    pub(super) async fn list_ledger(
        &self,
        filter: &LedgerFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let (kind, id) = filter.payer.as_ref().map_or((None, None), account_binds);
        let sql = match (&filter.payment_id, &filter.payer) {
            (Some(_), _) => PAGE_OF_PAYMENT,
            (None, Some(_)) => PAGE_OF_ACCOUNT,
            (None, None) => PAGE,
        };
        let rows = sqlx::query(sql)
            .bind(kind)
            .bind(id)
            .bind(filter.sku.as_deref())
            .bind(filter.since_us)
            .bind(filter.until_us)
            .bind(before)
            .bind(i64::from(limit))
            .bind(filter.payment_id.as_deref())
            .fetch_all(&self.read)
            .await
            .map_err(classify)?;
        ledger_entries(&rows)
    }

    pub(super) async fn entries_after(
        &self,
        payer: Option<&Payer>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let (kind, id) = payer.map_or((None, None), account_binds);
        let sql = if payer.is_some() {
            AFTER_OF_ACCOUNT
        } else {
            AFTER
        };
        let rows = sqlx::query(sql)
            .bind(kind)
            .bind(id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await
            .map_err(classify)?;
        ledger_entries(&rows)
    }

    pub(super) async fn list_held(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<HeldPayment>, StoreError> {
        let mut conn = self.read.acquire().await.map_err(classify)?;
        let rows = sqlx::query(HELD_PAGE)
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
        let payments = rows
            .iter()
            .map(|row| row.try_get::<String, _>(10))
            .collect::<Result<Vec<_>, _>>()
            .map_err(classify)?;
        let ids: Vec<&str> = payments.iter().map(String::as_str).collect();
        let mut event_types: HashMap<String, Vec<(String, EventDetail)>> = HashMap::new();
        for row in fetch_in(&mut conn, EVENT_FACTS, &ids, "").await? {
            event_types
                .entry(row.try_get(0).map_err(classify)?)
                .or_default()
                .push(event_fact(&row)?);
        }
        let mut held = Vec::with_capacity(rows.len());
        for (row, payment_id) in rows.iter().zip(payments) {
            held.push(HeldPayment {
                seq: row.try_get(9).map_err(classify)?,
                event: recorded_event(row).map_err(classify)?,
                wallet: row.try_get(11).map_err(classify)?,
                raw_customer_id: row.try_get(12).map_err(classify)?,
                event_types: event_types.get(&payment_id).cloned().unwrap_or_default(),
                payment_id,
            });
        }
        Ok(held)
    }

    pub(super) async fn held_summary(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(HELD_SUMMARY)
            .fetch_one(&self.read)
            .await
            .map_err(classify)?;
        Ok((u64::try_from(count).unwrap_or(0), oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::HELD_SUMMARY;
    use crate::store::sql::SQLITE_MIGRATIONS;

    /// The review queue's query must stay linear in the queue's size: each held event's
    /// "is it the payment's first?" lookup goes through `events_by_payment`.
    #[test]
    fn the_held_query_looks_up_each_payment_by_index() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for (_, _, sql) in SQLITE_MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {HELD_SUMMARY}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("SEARCH h USING INDEX events_by_payment")),
            "{plan:#?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.contains("SEARCH h USING INDEX events_held")),
            "{plan:#?}"
        );
    }
}
