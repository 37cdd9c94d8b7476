//! The stand-in's merchant API over HTTP: routes, filters, paging and the JSON it answers,
//! built here with the spec's field names and never from a client's types, so a client
//! that misreads a field fails against it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use rand::Rng;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::State;
use super::model::{LogEntry, PaymentRecord};

/// The largest `limit` a list accepts; more is a 400.
pub const MAX_LIMIT: u64 = 1000;
/// `limit` when none is given (Coinflow's documented default).
pub const DEFAULT_LIMIT: u64 = 100;

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: &Value) -> Answer {
    coinflow_shared::http_server::json(status, body)
}

fn error(status: StatusCode, message: &str) -> Answer {
    answer(status, &json!({ "error": message }))
}

/// Answers one request.
pub async fn handle<B>(state: Arc<State>, request: Request<B>) -> Answer {
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == state.api_key.expose_secret().as_bytes());
    if !authorized {
        state.counters.refused.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if let Some(injected) = inject(&state) {
        state.counters.injected.fetch_add(1, Ordering::Relaxed);
        return injected;
    }
    let params: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let path = request.uri().path();
    let path = path.strip_prefix("/api").unwrap_or(path);
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = request.method();
    let result = match (method, segments.as_slice()) {
        (&Method::GET, ["merchant", "webhooks"]) => deliveries(&state, &params),
        (&Method::POST, ["merchant", "webhooks", id]) => Ok(resend(&state, id)),
        (&Method::GET, ["merchant", "payments"]) => payments(&state, &params),
        (&Method::GET, ["merchant", "payments", id]) => Ok(payment(&state, id)),
        (&Method::GET, ["refunds", "payment", id, "all"]) => Ok(refunds(&state, id)),
        (&Method::GET, ["merchant", "chargebacks"]) => chargebacks(&state, &params),
        (_, ["merchant", "webhooks"] | ["merchant", "webhooks", _])
        | (_, ["merchant", "payments"] | ["merchant", "payments", _])
        | (_, ["refunds", "payment", _, "all"] | ["merchant", "chargebacks"]) => {
            Ok(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"))
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "not found")),
    };
    result.unwrap_or_else(|message| error(StatusCode::BAD_REQUEST, &message))
}

/// A 429 (`Retry-After: 0`) or a 503, at the configured rate.
fn inject(state: &State) -> Option<Answer> {
    if state.error_rate <= 0.0 {
        return None;
    }
    let mut rng = state.rng.lock().unwrap_or_else(PoisonError::into_inner);
    if rng.random::<f64>() >= state.error_rate {
        return None;
    }
    Some(if rng.random::<bool>() {
        let mut a = error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        a.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("0"));
        a
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
    })
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters one endpoint reads.
struct Params<'a>(&'a [(String, String)]);

impl Params<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{key} must be a number, not {v:?}"))
            })
            .transpose()
    }

    fn time(&self, key: &str) -> Result<Option<SystemTime>, String> {
        self.get(key)
            .map(|v| {
                humantime::parse_rfc3339_weak(v)
                    .map_err(|_| format!("{key} must be an ISO 8601 date-time, not {v:?}"))
            })
            .transpose()
    }

    /// `(page, limit)`: page from 1, limit from 1 to [`MAX_LIMIT`].
    fn paging(&self) -> Result<(usize, usize), String> {
        let page: u64 = self.number("page")?.unwrap_or(1);
        let limit: u64 = self.number("limit")?.unwrap_or(DEFAULT_LIMIT);
        if page == 0 {
            return Err("page starts at 1".into());
        }
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(format!("limit must be from 1 to {MAX_LIMIT}"));
        }
        let page = usize::try_from(page).map_err(|_| "page too large".to_owned())?;
        let limit = usize::try_from(limit).map_err(|_| "limit too large".to_owned())?;
        Ok((page, limit))
    }
}

fn page_of<T>(items: Vec<T>, (page, limit): (usize, usize)) -> Vec<T> {
    items
        .into_iter()
        .skip(page.saturating_sub(1).saturating_mul(limit))
        .take(limit)
        .collect()
}

fn iso(t: SystemTime) -> String {
    let latest = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_millis(t.clamp(UNIX_EPOCH, latest)).to_string()
}

fn iso_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    iso(t)
}

fn delivery_json(entry: &LogEntry) -> Value {
    let data = serde_json::from_slice::<Value>(&entry.packet)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&entry.packet).into_owned()));
    json!({
        "id": entry.id,
        "merchantId": entry.merchant_id,
        "eventType": entry.event_type,
        "category": entry.category,
        "version": "Version 2",
        "data": data,
        "sentAt": iso(entry.sent_at),
        "url": entry.url,
        "responseCode": entry.response_code,
    })
}

fn payment_json(p: &PaymentRecord) -> Value {
    json!({
        "paymentId": p.id,
        "merchantId": p.merchant_id,
        "createdAt": iso_ms(p.created_at_ms),
        "status": p.status,
        "wallet": p.wallet,
        "customer": { "rawCustomerId": p.raw_customer_id },
        "webhookInfo": p.webhook_info,
        "totals": { "subtotal": p.subtotal, "fees": p.fees, "total": p.total },
    })
}

/// `GET /merchant/webhooks`: newest first.
fn deliveries(state: &State, params: &[(String, String)]) -> Result<Answer, String> {
    let p = Params(params);
    let paging = p.paging()?;
    let code: Option<u16> = p.number("responseCode")?;
    let event_type = p.get("eventType");
    let start = p.time("startDate")?;
    let end = p.time("endDate")?;
    let transaction = p.get("transactionId");
    let merchant = p.get("merchantId");
    let search = p.get("search").map(str::to_lowercase);
    let mut matching: Vec<LogEntry> = state
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|e| code.is_none_or(|c| e.response_code == c))
        .filter(|e| event_type.is_none_or(|t| e.event_type == t))
        .filter(|e| start.is_none_or(|s| e.sent_at >= s))
        .filter(|e| end.is_none_or(|t| e.sent_at <= t))
        .filter(|e| transaction.is_none_or(|t| e.payment_id.as_deref() == Some(t)))
        .filter(|e| merchant.is_none_or(|m| e.merchant_id.as_deref() == Some(m)))
        .filter(|e| {
            search.as_deref().is_none_or(|s| {
                e.id.to_lowercase().contains(s)
                    || String::from_utf8_lossy(&e.packet)
                        .to_lowercase()
                        .contains(s)
            })
        })
        .cloned()
        .collect();
    matching.sort_by(|a, b| b.sent_at.cmp(&a.sent_at).then(b.seq.cmp(&a.seq)));
    let page: Vec<Value> = page_of(matching, paging)
        .iter()
        .map(delivery_json)
        .collect();
    Ok(answer(StatusCode::OK, &Value::Array(page)))
}

/// `POST /merchant/webhooks/{id}`: posts the logged packet again in the background, as a
/// job; the attempt joins the log when it has its answer.
fn resend(state: &Arc<State>, id: &str) -> Answer {
    let packet = state
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|e| e.id == id)
        .map(|e| e.packet.clone());
    let Some(packet) = packet else {
        return error(StatusCode::NOT_FOUND, "Webhook log not found");
    };
    let job = state.counters.jobs.fetch_add(1, Ordering::Relaxed) + 1;
    let sender = state.sender.clone();
    let task = tokio::spawn(async move {
        sender.attempt(&packet).await;
    });
    state
        .jobs
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(task);
    answer(StatusCode::OK, &json!({ "jobId": format!("job-{job}") }))
}

fn filtered_payments<'a>(
    state: &'a State,
    p: &Params<'_>,
) -> Result<impl Iterator<Item = &'a PaymentRecord>, String> {
    let since: Option<i64> = p.number("since")?;
    let until: Option<i64> = p.number("until")?;
    let status = p.get("status").map(str::to_owned);
    Ok(state.payments.iter().filter(move |x| {
        since.is_none_or(|s| x.created_at_ms >= s)
            && until.is_none_or(|u| x.created_at_ms <= u)
            && status.as_deref().is_none_or(|s| x.status == s)
    }))
}

/// `GET /merchant/payments`: newest first.
fn payments(state: &State, params: &[(String, String)]) -> Result<Answer, String> {
    let p = Params(params);
    let paging = p.paging()?;
    let mut matching: Vec<&PaymentRecord> = filtered_payments(state, &p)?.collect();
    matching.sort_by_key(|p| std::cmp::Reverse(p.created_at_ms));
    let page: Vec<Value> = page_of(matching, paging)
        .into_iter()
        .map(payment_json)
        .collect();
    Ok(answer(StatusCode::OK, &Value::Array(page)))
}

fn find<'a>(state: &'a State, id: &str) -> Option<&'a PaymentRecord> {
    state.payments.iter().find(|p| p.id == id)
}

/// `GET /merchant/payments/{paymentId}`.
fn payment(state: &State, id: &str) -> Answer {
    match find(state, id) {
        Some(p) => answer(StatusCode::OK, &payment_json(p)),
        None => error(StatusCode::NOT_FOUND, "Payment not found"),
    }
}

/// `GET /refunds/payment/{paymentId}/all`.
fn refunds(state: &State, id: &str) -> Answer {
    let Some(p) = find(state, id) else {
        return error(StatusCode::NOT_FOUND, "Payment not found");
    };
    let list: Vec<Value> = p
        .refunds
        .iter()
        .map(|r| {
            json!({
                "paymentId": p.id,
                "status": r.status,
                "createdAt": iso_ms(r.created_at_ms),
                "totals": { "subtotal": r.subtotal, "total": r.total },
            })
        })
        .collect();
    answer(StatusCode::OK, &Value::Array(list))
}

/// `GET /merchant/chargebacks`: newest first; `since`/`until` on when each opened.
fn chargebacks(state: &State, params: &[(String, String)]) -> Result<Answer, String> {
    let p = Params(params);
    let paging = p.paging()?;
    let since: Option<i64> = p.number("since")?;
    let until: Option<i64> = p.number("until")?;
    let status = p.get("status");
    let mut matching: Vec<(&PaymentRecord, &super::model::ChargebackRecord)> = state
        .payments
        .iter()
        .filter_map(|p| p.chargeback.as_ref().map(|c| (p, c)))
        .filter(|(_, c)| {
            since.is_none_or(|s| c.created_at_ms >= s)
                && until.is_none_or(|u| c.created_at_ms <= u)
                && status.is_none_or(|s| c.status == s)
        })
        .collect();
    matching.sort_by_key(|(_, c)| std::cmp::Reverse(c.created_at_ms));
    let page: Vec<Value> = page_of(matching, paging)
        .into_iter()
        .map(|(p, c)| {
            json!({
                "chargebackId": c.id,
                "paymentId": p.id,
                "status": c.status,
                "createdAt": iso_ms(c.created_at_ms),
            })
        })
        .collect();
    Ok(answer(StatusCode::OK, &Value::Array(page)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("gen%2D1"), "gen-1");
        assert_eq!(percent_decode("a%20b%zz"), "a b%zz");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn pages_from_one() {
        let items: Vec<u32> = (0..25).collect();
        assert_eq!(page_of(items.clone(), (1, 10)), (0..10).collect::<Vec<_>>());
        assert_eq!(
            page_of(items.clone(), (3, 10)),
            (20..25).collect::<Vec<_>>()
        );
        assert!(page_of(items, (4, 10)).is_empty());
        let params = vec![("page".to_owned(), "0".to_owned())];
        assert!(Params(&params).paging().is_err());
        let params = vec![("limit".to_owned(), "1001".to_owned())];
        assert!(Params(&params).paging().is_err());
    }
}
