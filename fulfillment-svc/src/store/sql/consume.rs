//! Spending a consumable sku: idempotent on the caller's key, refused past the balance.

use std::time::SystemTime;

use super::{Core, classify, ledger_entry};
use crate::store::{Payer, Spend, Spent, StoreError, micros};

/// The spend recorded under an idempotency key.
const SPEND_BY_KEY: &str = concat!(
    "SELECT ",
    ledger_columns!(),
    " FROM ledger WHERE idempotency_key = $1"
);
/// A payer's balance of one sku: `$1` its wallet or `$2` its customer id (the other
/// `NULL`), `$3` the sku.
const BALANCE: &str = "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM ledger \
     WHERE (wallet = $1 OR raw_customer_id = $2) AND sku = $3";
/// A spend.
const INSERT_SPEND: &str = concat!(
    "INSERT INTO ledger (kind, sku, quantity, wallet, raw_customer_id, actor, idempotency_key, \
     recorded_at_us) VALUES ('consume', $1, $2, $3, $4, 'api', $5, $6) RETURNING ",
    ledger_columns!()
);

/// The payer as the two nullable columns it is recorded under (wallet, customer id).
pub(super) fn payer_binds(payer: &Payer) -> (Option<&str>, Option<&str>) {
    match payer {
        Payer::Wallet(w) => (Some(w), None),
        Payer::RawCustomerId(c) => (None, Some(c)),
    }
}

impl Core {
    pub(super) async fn consume_once(&self, spend: &Spend) -> Result<Spent, StoreError> {
        let (wallet, customer) = payer_binds(&spend.payer);
        let (column, key) = match &spend.payer {
            Payer::Wallet(w) => ("wallet", w),
            Payer::RawCustomerId(c) => ("raw_customer_id", c),
        };
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        self.lock(&mut tx, &[&format!("payer:{column}:{key}")])
            .await?;
        let existing = sqlx::query(SPEND_BY_KEY)
            .bind(&spend.idempotency_key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        let balance: i64 = sqlx::query_scalar(BALANCE)
            .bind(wallet)
            .bind(customer)
            .bind(&spend.sku)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        if let Some(row) = existing {
            let entry = ledger_entry(&row).map_err(classify)?;
            let same_payer = match &spend.payer {
                Payer::Wallet(w) => &entry.wallet == w,
                Payer::RawCustomerId(c) => entry.raw_customer_id.as_ref() == Some(c),
            };
            if !same_payer || entry.sku != spend.sku || entry.quantity != -spend.quantity {
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
        if balance < spend.quantity {
            return Err(StoreError::Precondition(format!(
                "insufficient balance: {key:?} holds {balance} {:?}, asked to consume {}",
                spend.sku, spend.quantity
            )));
        }
        self.lock_appends(&mut tx).await?;
        let row = sqlx::query(INSERT_SPEND)
            .bind(&spend.sku)
            .bind(-spend.quantity)
            .bind(wallet.unwrap_or(""))
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
