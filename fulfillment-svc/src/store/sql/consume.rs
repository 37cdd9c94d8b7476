//! Spending a consumable sku: idempotent on the caller's key, refused past the balance. The
//! balance is the payer's account's ([`account!`]), whichever of its identities the caller
//! names.
//!
//! Two spends of one account must not both pass the balance check. On PostgreSQL a spend
//! takes the ledger-append lock ([`Core::lock_appends`]) *before* it reads anything: every
//! ledger row (grants, revocations, spends, and so the links between identities) is
//! appended under that lock, held to commit, so under READ COMMITTED the balance read is
//! the balance at commit, for every identity of the account and for any link committed
//! concurrently. SQLite's single writer (`BEGIN IMMEDIATE`) gives the same.

use std::time::SystemTime;

use sqlx::Row;

use super::{Core, account_binds, classify, ledger_entry};
use crate::store::{Payer, Spend, Spent, StoreError, micros};

/// The spend recorded under the idempotency key `$3`, and (last column, 1 or 0) whether it
/// is the account's of `$1`, `$2`.
pub(super) const SPEND_BY_KEY: &str = concat!(
    account!(),
    "SELECT ",
    ledger_columns!(),
    ", CAST(CASE WHEN ",
    in_account!(),
    " THEN 1 ELSE 0 END AS BIGINT) FROM ledger WHERE idempotency_key = $3"
);
/// The balance of the sku `$3` of the account of `$1`, `$2`.
pub(super) const BALANCE: &str = concat!(
    account!(),
    "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM ledger WHERE ",
    of_account!(),
    " AND sku = $3"
);
/// A spend.
const INSERT_SPEND: &str = concat!(
    "INSERT INTO ledger (kind, sku, quantity, wallet, raw_customer_id, actor, idempotency_key, \
     recorded_at_us) VALUES ('consume', $1, $2, $3, $4, 'api', $5, $6) RETURNING ",
    ledger_columns!()
);
/// Where [`SPEND_BY_KEY`]'s "is it the account's" column is.
const SPEND_OURS: usize = 13;

impl Core {
    pub(super) async fn consume_once(&self, spend: &Spend) -> Result<Spent, StoreError> {
        let (kind, id) = account_binds(&spend.payer);
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        self.lock_appends(&mut tx).await?;
        let existing = sqlx::query(SPEND_BY_KEY)
            .bind(kind)
            .bind(id)
            .bind(&spend.idempotency_key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let balance: i64 = sqlx::query_scalar(BALANCE)
            .bind(kind)
            .bind(id)
            .bind(&spend.sku)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        if let Some(row) = existing {
            let entry = ledger_entry(&row).map_err(classify)?;
            let ours: i64 = row.try_get(SPEND_OURS).map_err(classify)?;
            if ours != 1 || entry.sku != spend.sku || entry.quantity != -spend.quantity {
                return Err(StoreError::Precondition(format!(
                    "idempotency_key {:?} was used for a different spend",
                    spend.idempotency_key
                )));
            }
            return Ok(Spent {
                entry,
                balance,
                duplicate: true,
            });
        }
        let (wallet, customer, named) = match &spend.payer {
            Payer::Wallet(w) => (w.as_str(), None, w),
            Payer::RawCustomerId(c) => ("", Some(c.as_str()), c),
        };
        if balance < spend.quantity {
            return Err(StoreError::Precondition(format!(
                "insufficient balance: {named:?} holds {balance} {:?}, asked to consume {}",
                spend.sku, spend.quantity
            )));
        }
        let row = sqlx::query(INSERT_SPEND)
            .bind(&spend.sku)
            .bind(-spend.quantity)
            .bind(wallet)
            .bind(customer)
            .bind(&spend.idempotency_key)
            .bind(micros(SystemTime::now()))
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        let entry = ledger_entry(&row).map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.notify(std::slice::from_ref(&entry));
        Ok(Spent {
            entry,
            balance: balance - spend.quantity,
            duplicate: false,
        })
    }
}
