//! Closing a held payment: an operator's approval (a plan from the catalog, then whatever
//! entries the payment's events entitle) or rejection (a zero-quantity audit entry).

use std::time::SystemTime;

use sqlx::Row;

use super::record::{Cause, REVIEWS, load_stored};
use super::{Core, classify, fetch_in};
use crate::catalog::Grant;
use crate::decision::GrantPlan;
use crate::store::reconcile::{Delta, Kind, deltas};
use crate::store::{Resolution, Resolved, StoreError, micros};

/// How many events a payment has, and how many of them were held.
const EVENT_COUNTS: &str = "SELECT CAST(COUNT(*) AS BIGINT), \
     CAST(COALESCE(SUM(CASE WHEN outcome = 'held' THEN 1 ELSE 0 END), 0) AS BIGINT) \
     FROM events WHERE payment_id = $1";
/// A payment's review.
const INSERT_REVIEW: &str = "INSERT INTO reviews (payment_id, decision, operator, note, item, \
     recorded_at_us) VALUES ($1, $2, $3, $4, $5, $6)";

impl Core {
    pub(super) async fn resolve_once(
        &self,
        payment_id: &str,
        resolution: &Resolution,
        operator: &str,
        note: &str,
    ) -> Result<Resolved, StoreError> {
        let decision = match resolution {
            Resolution::Approve(_) => "approved",
            Resolution::Reject { .. } => "rejected",
        };
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        self.lock(&mut tx, payment_id).await?;
        let review = fetch_in(&mut tx, REVIEWS, &[payment_id], "").await?;
        if let Some(row) = review.first() {
            let done: String = row.try_get(1).map_err(classify)?;
            return if done == decision {
                Ok(Resolved {
                    review: done,
                    entries: Vec::new(),
                    duplicate: true,
                })
            } else {
                Err(StoreError::Precondition(format!(
                    "payment {payment_id:?} was already {done}; a review cannot be changed"
                )))
            };
        }
        let (events, held): (i64, i64) = sqlx::query_as(EVENT_COUNTS)
            .bind(payment_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        if events == 0 {
            return Err(StoreError::NotFound(format!(
                "no events recorded for payment {payment_id:?}"
            )));
        }
        let stored = load_stored(&mut tx, &[payment_id])
            .await?
            .remove(payment_id)
            .unwrap_or_default();
        if held == 0 || stored.plan.is_some() {
            return Err(StoreError::Precondition(format!(
                "payment {payment_id:?} is not held for review"
            )));
        }
        let now = micros(SystemTime::now());
        let item = match resolution {
            Resolution::Approve(plan) => Some(plan.item.as_str()),
            Resolution::Reject { .. } => None,
        };
        sqlx::query(INSERT_REVIEW)
            .bind(payment_id)
            .bind(decision)
            .bind(operator)
            .bind(note)
            .bind(item)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        let actor = format!("operator:{operator}");
        let cause = Cause {
            event_key: None,
            actor: &actor,
            note: Some(note),
        };
        let entries = match resolution {
            Resolution::Approve(plan) => {
                super::record::insert_plans(&mut tx, &[plan], "review", now).await?;
                let target: &[Grant] = if stored.facts.entitled(self.policy) {
                    &plan.grants
                } else {
                    &[]
                };
                self.append(&mut tx, plan, &deltas(target, &stored.current), &cause, now)
                    .await?
            }
            Resolution::Reject {
                wallet,
                raw_customer_id,
            } => {
                let audit = GrantPlan {
                    payment_id: payment_id.to_owned(),
                    wallet: wallet.clone(),
                    raw_customer_id: raw_customer_id.clone(),
                    item: String::new(),
                    catalog_version: String::new(),
                    grants: Vec::new(),
                };
                let reject = Delta {
                    kind: Kind::Reject,
                    sku: String::new(),
                    quantity: 0,
                };
                self.append(&mut tx, &audit, &[reject], &cause, now).await?
            }
        };
        tx.commit().await.map_err(classify)?;
        self.notify(&entries);
        Ok(Resolved {
            review: decision.to_owned(),
            entries,
            duplicate: false,
        })
    }
}
