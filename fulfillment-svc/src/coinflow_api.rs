//! A client of Coinflow's merchant API: the webhook delivery log, resend, payments, refunds
//! and chargebacks, what recovery and reconciliation read once Coinflow has stopped
//! retrying a webhook (16 attempts over about 18 hours).
//!
//! **This module owns every endpoint path, query parameter and JSON field name it uses.**
//! They come from Coinflow's public OpenAPI document (`/work/shared/coinflow/merchant-api.md`)
//! and are provisional: a correction against the sandbox touches this file only. Unknown
//! fields in answers are ignored. Names the spec does not give, and this module had to
//! pick, are marked *provisional* where they are declared:
//!
//! - a payment's status: `status` (the name of the query parameter that filters on it);
//!   values `Settled`, `Declined`, `Authorized`;
//! - a refund: `paymentId`, `status`, `createdAt`, `totals`;
//! - a chargeback: `chargebackId`, `paymentId`, `status` (`Opened`, `Won`, `Lost`),
//!   `createdAt`;
//! - `createdAt` may be epoch milliseconds or an ISO 8601 string ([`Timestamp`]);
//! - every list endpoint answers a bare JSON array (the spec says so for deliveries and
//!   payments), and resend answers `{"jobId": …}` with a string or a number.
//!
//! Transport: HTTP/1.1 over rustls (the `ring` provider, Mozilla's roots from
//! `webpki-roots`; no system OpenSSL), and plain `http://` for a local stand-in. Every
//! request has a connect timeout and a total timeout (answer and body). 429, 5xx, timeouts
//! and connection failures are retried with exponential backoff, honouring `Retry-After`
//! in seconds (an HTTP-date is ignored and the backoff used), within a bound on attempts
//! and on the total time per request ([`RetryPolicy`]). 401 and 403 are fatal at once and
//! name [`API_KEY_ENV`], never the key; 404 on resend is [`ApiError::DeliveryNotFound`].
//!
//! The API key is sent as the raw `Authorization: <key>` header, marked sensitive. It is
//! never printed: `Debug` of [`ApiConfig`] and [`CoinflowApi`] redacts it, and every error
//! text that carries something the server said has the key scrubbed out of it.
//!
//! Lists are paged with `page` (from 1) and `limit` ([`ApiConfig::page_limit`], 100 by
//! default) until a page comes back shorter than `limit`. A server that caps `limit` below
//! what was asked would make the first page look short and end the listing early; Coinflow
//! documents a default of 100, which is what is asked. Entries repeated across pages
//! (a newest-first list that grew during the sweep) are kept once, by id.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use url::Url;

/// The environment variable that holds the merchant API key (not the webhook Validation
/// Key: a different secret).
pub const API_KEY_ENV: &str = "COINFLOW_API_KEY";
/// Coinflow's production API.
pub const PRODUCTION_URL: &str = "https://api.coinflow.cash/api";
/// Coinflow's sandbox API.
pub const SANDBOX_URL: &str = "https://api-sandbox.coinflow.cash/api";
/// Entries asked for per page (Coinflow's documented default).
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
/// The largest answer body read (a page of 100 deliveries is a few hundred KiB).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// The most text of an error answer kept in an error.
const MAX_ERROR_TEXT: usize = 300;

/// Endpoint paths, as segments under the base URL.
mod path {
    /// `GET /merchant/webhooks`: the delivery log.
    pub const DELIVERIES: &[&str] = &["merchant", "webhooks"];
    /// `POST /merchant/webhooks/{webhookLogId}`: resend one delivery.
    pub const RESEND: &[&str] = &["merchant", "webhooks"];
    /// `GET /merchant/payments` and `GET /merchant/payments/{paymentId}`.
    pub const PAYMENTS: &[&str] = &["merchant", "payments"];
    /// `GET /refunds/payment/{paymentId}/all`: before and after the id.
    pub const REFUNDS: (&[&str], &[&str]) = (&["refunds", "payment"], &["all"]);
    /// `GET /merchant/chargebacks`.
    pub const CHARGEBACKS: &[&str] = &["merchant", "chargebacks"];
}

/// Query parameter names.
mod query {
    pub const PAGE: &str = "page";
    pub const LIMIT: &str = "limit";
    pub const RESPONSE_CODE: &str = "responseCode";
    pub const EVENT_TYPE: &str = "eventType";
    pub const START_DATE: &str = "startDate";
    pub const END_DATE: &str = "endDate";
    pub const SINCE: &str = "since";
    pub const UNTIL: &str = "until";
}

/// One entry of the delivery log: one attempt Coinflow made to post a webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The delivery log id: what [`CoinflowApi::resend`] takes.
    pub id: String,
    /// The merchant.
    #[serde(default)]
    pub merchant_id: Option<String>,
    /// As in the envelope.
    pub event_type: String,
    /// As in the envelope.
    #[serde(default)]
    pub category: Option<String>,
    /// `Legacy`, `Version 1`, `Version 2` or `Version 3`.
    #[serde(default)]
    pub version: Option<String>,
    /// The packet that was posted: the envelope `{eventType, category, created, data}`,
    /// as the API returned it.
    pub data: Box<RawValue>,
    /// When this attempt was sent (ISO 8601, as the API wrote it; see [`Self::sent_at`]).
    #[serde(rename = "sentAt")]
    pub sent_at_text: String,
    /// Where it was sent.
    #[serde(default)]
    pub url: Option<String>,
    /// What the receiver answered: its status, or Coinflow's code for no answer.
    #[serde(default)]
    pub response_code: Option<i64>,
}

impl Delivery {
    /// Whether the receiver answered 200, the only answer Coinflow counts as delivered.
    pub fn acked(&self) -> bool {
        self.response_code == Some(200)
    }

    /// When this attempt was sent, if `sentAt` is RFC 3339.
    pub fn sent_at(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.sent_at_text).ok()
    }

    /// The payment the packet is about (`data.id`, or `data.paymentId` on refunds).
    pub fn payment_id(&self) -> Option<String> {
        coinflow_shared::convert::best_effort_payment_id(self.data.get().as_bytes())
    }
}

/// `createdAt`, which the spec does not type (provisional): epoch milliseconds or an
/// ISO 8601 string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Timestamp {
    /// Epoch milliseconds.
    Millis(i64),
    /// ISO 8601 text.
    Text(String),
}

impl Timestamp {
    /// As epoch milliseconds, when it reads as a time.
    pub fn millis(&self) -> Option<i64> {
        match self {
            Self::Millis(ms) => Some(*ms),
            Self::Text(text) => {
                let t = humantime::parse_rfc3339_weak(text).ok()?;
                let d = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
                i64::try_from(d.as_millis()).ok()
            }
        }
    }
}

/// An amount: `{"cents": integer, "currency"?: string}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Cents {
    /// Cents.
    pub cents: i64,
    /// Currency, when sent.
    #[serde(default)]
    pub currency: Option<String>,
}

/// A payment's or a refund's `totals` (other keys ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Totals {
    /// The price of the goods.
    #[serde(default)]
    pub subtotal: Option<Cents>,
    /// Fees.
    #[serde(default)]
    pub fees: Option<Cents>,
    /// Charged to the payer.
    #[serde(default)]
    pub total: Option<Cents>,
}

/// A payment as `GET /merchant/payments` lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentSummary {
    /// The Coinflow payment id (the business key).
    pub payment_id: String,
    /// When the payment was created.
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    /// *Provisional name*: the payment's status, as filtered by the `status` query
    /// parameter (`Settled`, `Declined`, `Authorized`).
    #[serde(default)]
    pub status: Option<String>,
    /// The payer, when the payment has one (v2; v3 names the payer in `customer`).
    #[serde(default)]
    pub wallet: Option<String>,
    /// The customer object, kept raw.
    #[serde(default)]
    pub customer: Option<Box<RawValue>>,
    /// What the merchant passed at checkout.
    #[serde(default)]
    pub webhook_info: Option<serde_json::Value>,
    /// Amounts.
    #[serde(default)]
    pub totals: Option<Totals>,
}

/// A refund of a payment (*provisional field names*).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refund {
    /// The refunded payment.
    pub payment_id: String,
    /// `Pending`, `Invoiced`, `Settled` or `Failed`.
    #[serde(default)]
    pub status: Option<String>,
    /// When it was created.
    #[serde(default)]
    pub created_at: Option<Timestamp>,
    /// Amounts.
    #[serde(default)]
    pub totals: Option<Totals>,
}

/// A chargeback (*provisional field names*).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chargeback {
    /// The chargeback's id.
    #[serde(default)]
    pub chargeback_id: Option<String>,
    /// The disputed payment.
    pub payment_id: String,
    /// `Opened`, `Won` or `Lost`.
    #[serde(default)]
    pub status: Option<String>,
    /// When it was opened.
    #[serde(default)]
    pub created_at: Option<Timestamp>,
}

/// `{"jobId": …}`, a string or a number.
#[derive(Deserialize)]
struct ResendAnswer {
    #[serde(rename = "jobId")]
    job_id: serde_json::Value,
}

/// A span of `sentAt` times, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// From.
    pub start: SystemTime,
    /// To.
    pub end: SystemTime,
}

impl Window {
    /// The last `span` before now.
    pub fn last(span: Duration) -> Self {
        let end = SystemTime::now();
        Self {
            start: end.checked_sub(span).unwrap_or(SystemTime::UNIX_EPOCH),
            end,
        }
    }
}

/// Server-side filters of the delivery log. The API takes one `responseCode`, so "every
/// delivery whose answer was not 200" is all of them filtered here
/// ([`CoinflowApi::unacked_deliveries`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// Only deliveries the receiver answered with this.
    pub response_code: Option<u16>,
    /// Only this event type (exact, Title Case with spaces).
    pub event_type: Option<String>,
}

/// How failed requests are retried: exponential backoff from `base_delay`, at most
/// `max_delay` between two attempts unless `Retry-After` asks for longer, at most
/// `max_attempts` attempts and never past `max_total` after the first began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The wait after the first failure.
    pub base_delay: Duration,
    /// The longest computed wait.
    pub max_delay: Duration,
    /// The most one request may take, waits and attempts included.
    pub max_total: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_total: Duration::from_secs(180),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next attempt, after `attempts` have failed and `elapsed` has
    /// passed since the first began; `None` when the bound on attempts or total time says
    /// to give up. `retry_after` (the server's `Retry-After`) replaces the backoff.
    pub fn next_wait(
        &self,
        attempts: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let wait = retry_after.unwrap_or_else(|| {
            let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
            self.base_delay.saturating_mul(factor).min(self.max_delay)
        });
        (elapsed.saturating_add(wait) < self.max_total).then_some(wait)
    }
}

/// Where the API is and how to talk to it.
#[derive(Clone)]
pub struct ApiConfig {
    /// The base URL, e.g. [`PRODUCTION_URL`], [`SANDBOX_URL`] or a local stand-in's
    /// `http://127.0.0.1:port`.
    pub base_url: String,
    /// The merchant API key ([`API_KEY_ENV`]).
    pub api_key: SecretString,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// The most one attempt may take, from sending to the end of the answer's body.
    pub request_timeout: Duration,
    /// Entries per page.
    pub page_limit: u32,
    /// The most pages one listing reads before failing.
    pub max_pages: u32,
    /// Backoff on 429, 5xx, timeouts and connection failures.
    pub retry: RetryPolicy,
}

impl ApiConfig {
    /// Defaults for `base_url` with `api_key`: 10 s to connect, 30 s per attempt, pages of
    /// 100, at most 10,000 pages, [`RetryPolicy::default`].
    pub fn new(base_url: impl Into<String>, api_key: SecretString) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            page_limit: DEFAULT_PAGE_LIMIT,
            max_pages: 10_000,
            retry: RetryPolicy::default(),
        }
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"[redacted]")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("page_limit", &self.page_limit)
            .field("max_pages", &self.max_pages)
            .field("retry", &self.retry)
            .finish()
    }
}

/// What went wrong talking to the merchant API. No variant carries the API key.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The base URL is unusable.
    #[error("invalid Coinflow API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The key cannot be sent as a header value.
    #[error("{API_KEY_ENV} is not a valid HTTP header value (check it for newlines)")]
    InvalidKey,
    /// The TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// 401 or 403: fatal, retrying cannot help.
    #[error(
        "Coinflow's merchant API refused the API key (HTTP {status}) on {what}: check \
         {API_KEY_ENV} (the merchant API key, not the webhook Validation Key)"
    )]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The request.
        what: String,
    },
    /// Resend of a delivery log id Coinflow does not know.
    #[error("no webhook delivery {id:?} to resend (HTTP 404)")]
    DeliveryNotFound {
        /// The delivery log id.
        id: String,
    },
    /// 404 on anything else.
    #[error("{what}: not found (HTTP 404)")]
    NotFound {
        /// The request.
        what: String,
    },
    /// Another answer that retrying cannot fix (400, 405, 422, …).
    #[error("{what}: HTTP {status}: {text}")]
    Status {
        /// The request.
        what: String,
        /// The status.
        status: u16,
        /// The start of the answer's body.
        text: String,
    },
    /// Retryable failures until the bound on attempts or time.
    #[error("{what}: gave up after {attempts} attempts; last: {last}")]
    GaveUp {
        /// The request.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The answer was not the JSON expected.
    #[error("{what}: unexpected answer: {reason}")]
    Decode {
        /// The request.
        what: String,
        /// What did not fit (a field name, usually).
        reason: String,
    },
    /// The answer's body is over [`MAX_BODY_BYTES`].
    #[error("{what}: answer over {MAX_BODY_BYTES} bytes")]
    TooLarge {
        /// The request.
        what: String,
    },
    /// A listing went on past [`ApiConfig::max_pages`].
    #[error("{what}: more than {pages} pages")]
    TooManyPages {
        /// The request.
        what: String,
        /// The bound.
        pages: u32,
    },
}

/// How one attempt ended.
enum Attempt {
    Answer(StatusCode, HeaderMap, Bytes),
    Timeout,
    Transport(String),
    TooLarge,
}

/// A client of Coinflow's merchant API. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct CoinflowApi {
    base: Url,
    key: HeaderValue,
    config: ApiConfig,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl fmt::Debug for CoinflowApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoinflowApi")
            .field("base", &self.base.as_str())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CoinflowApi {
    /// A client for `config`; nothing is sent yet.
    pub fn new(config: ApiConfig) -> Result<Self, ApiError> {
        let invalid = |reason: &str| ApiError::InvalidUrl {
            url: config.base_url.clone(),
            reason: reason.to_owned(),
        };
        let base = Url::parse(&config.base_url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("must be an http:// or https:// URL"));
        }
        if base.query().is_some() || !base.username().is_empty() || base.password().is_some() {
            return Err(invalid("must have no query and no credentials"));
        }
        let mut key = HeaderValue::from_str(config.api_key.expose_secret())
            .map_err(|_| ApiError::InvalidKey)?;
        key.set_sensitive(true);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ApiError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            base,
            key,
            client: Client::builder(TokioExecutor::new()).build(https),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ApiConfig {
        &self.config
    }

    /// Every delivery sent in `window` that matches `filter` (`GET /merchant/webhooks`
    /// with `startDate`/`endDate` in ISO 8601), all pages.
    pub async fn deliveries(
        &self,
        window: Window,
        filter: &DeliveryFilter,
    ) -> Result<Vec<Delivery>, ApiError> {
        let mut params = vec![
            (query::START_DATE, iso8601(window.start)),
            (query::END_DATE, iso8601(window.end)),
        ];
        if let Some(code) = filter.response_code {
            params.push((query::RESPONSE_CODE, code.to_string()));
        }
        if let Some(event_type) = &filter.event_type {
            params.push((query::EVENT_TYPE, event_type.clone()));
        }
        let all: Vec<Delivery> = self.paged(path::DELIVERIES, &params).await?;
        let mut seen = HashSet::new();
        Ok(all
            .into_iter()
            .filter(|d| seen.insert(d.id.clone()))
            .collect())
    }

    /// Every delivery sent in `window` (of `event_type`, when given) that the receiver did
    /// not answer with 200. The API filters on one `responseCode` only, so this lists them
    /// all and filters here.
    pub async fn unacked_deliveries(
        &self,
        window: Window,
        event_type: Option<&str>,
    ) -> Result<Vec<Delivery>, ApiError> {
        let filter = DeliveryFilter {
            response_code: None,
            event_type: event_type.map(str::to_owned),
        };
        let mut all = self.deliveries(window, &filter).await?;
        all.retain(|d| !d.acked());
        Ok(all)
    }

    /// Asks Coinflow to post the logged packet of delivery `webhook_log_id` again, signed
    /// as usual (`POST /merchant/webhooks/{id}`). Returns the job id. A 5xx or a lost
    /// answer is retried like any call, so a packet may be posted twice; receivers
    /// deduplicate it by its transport identity.
    pub async fn resend(&self, webhook_log_id: &str) -> Result<String, ApiError> {
        let url = self.url(path::RESEND, &[webhook_log_id], &[], &[]);
        let body = self.call(Method::POST, url).await.map_err(|e| match e {
            ApiError::NotFound { .. } => ApiError::DeliveryNotFound {
                id: webhook_log_id.to_owned(),
            },
            other => other,
        })?;
        let answer: ResendAnswer = self.decode(&body, "POST resend")?;
        Ok(match answer.job_id {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// Every payment created from `since_ms` to `until_ms` (epoch milliseconds, UTC), all
    /// pages (`GET /merchant/payments`).
    pub async fn payments(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<PaymentSummary>, ApiError> {
        let params = [
            (query::SINCE, since_ms.to_string()),
            (query::UNTIL, until_ms.to_string()),
        ];
        let all: Vec<PaymentSummary> = self.paged(path::PAYMENTS, &params).await?;
        let mut seen = HashSet::new();
        Ok(all
            .into_iter()
            .filter(|p| seen.insert(p.payment_id.clone()))
            .collect())
    }

    /// One payment (`GET /merchant/payments/{paymentId}`); `None` on 404.
    pub async fn payment(&self, payment_id: &str) -> Result<Option<PaymentSummary>, ApiError> {
        let url = self.url(path::PAYMENTS, &[payment_id], &[], &[]);
        match self.call(Method::GET, url).await {
            Ok(body) => self.decode(&body, "GET payment").map(Some),
            Err(ApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A payment's refunds (`GET /refunds/payment/{paymentId}/all`).
    pub async fn refunds(&self, payment_id: &str) -> Result<Vec<Refund>, ApiError> {
        let (before, after) = path::REFUNDS;
        let url = self.url(before, &[payment_id], after, &[]);
        let body = self.call(Method::GET, url).await?;
        self.decode(&body, "GET refunds")
    }

    /// Every chargeback from `since_ms` to `until_ms`, all pages
    /// (`GET /merchant/chargebacks`).
    pub async fn chargebacks(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Chargeback>, ApiError> {
        let params = [
            (query::SINCE, since_ms.to_string()),
            (query::UNTIL, until_ms.to_string()),
        ];
        self.paged(path::CHARGEBACKS, &params).await
    }

    fn url(&self, before: &[&str], ids: &[&str], after: &[&str], params: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        // Checked in `new`: the base can be a base, so there are segments to extend.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments
                .pop_if_empty()
                .extend(before)
                .extend(ids)
                .extend(after);
        }
        if !params.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    /// Reads every page of a list endpoint.
    async fn paged<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        params: &[(&str, String)],
    ) -> Result<Vec<T>, ApiError> {
        let limit = self.config.page_limit.max(1);
        let mut out = Vec::new();
        for page in 1..=self.config.max_pages {
            let mut all = params.to_vec();
            all.push((query::PAGE, page.to_string()));
            all.push((query::LIMIT, limit.to_string()));
            let url = self.url(segments, &[], &[], &all);
            let body = self.call(Method::GET, url).await?;
            let items: Vec<T> = self.decode(&body, &format!("GET /{}", segments.join("/")))?;
            let short = items.len() < limit as usize;
            out.extend(items);
            if short {
                return Ok(out);
            }
        }
        Err(ApiError::TooManyPages {
            what: format!("GET /{}", segments.join("/")),
            pages: self.config.max_pages,
        })
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8], what: &str) -> Result<T, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::Decode {
            what: what.to_owned(),
            reason: self.scrub(&e.to_string()),
        })
    }

    /// One request, retried as [`RetryPolicy`] allows; the body of a 2xx answer.
    async fn call(&self, method: Method, url: Url) -> Result<Bytes, ApiError> {
        let what = format!("{method} {}", url.path());
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (last, retry_after) = match self.attempt(&method, &url).await {
                Attempt::Answer(status, _, body) if status.is_success() => return Ok(body),
                Attempt::Answer(status, headers, body) => {
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        return Err(ApiError::Unauthorized {
                            status: status.as_u16(),
                            what,
                        });
                    }
                    if status == StatusCode::NOT_FOUND {
                        return Err(ApiError::NotFound { what });
                    }
                    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                        return Err(ApiError::Status {
                            what,
                            status: status.as_u16(),
                            text: self.scrub(&snippet(&body)),
                        });
                    }
                    (format!("HTTP {}", status.as_u16()), retry_after(&headers))
                }
                Attempt::Timeout => (
                    format!("no answer within {:?}", self.config.request_timeout),
                    None,
                ),
                Attempt::Transport(message) => (self.scrub(&message), None),
                Attempt::TooLarge => return Err(ApiError::TooLarge { what }),
            };
            match self
                .config
                .retry
                .next_wait(attempts, started.elapsed(), retry_after)
            {
                Some(wait) => {
                    tracing::debug!(%what, attempts, %last, ?wait, "retrying Coinflow API call");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Err(ApiError::GaveUp {
                        what,
                        attempts,
                        last,
                    });
                }
            }
        }
    }

    async fn attempt(&self, method: &Method, url: &Url) -> Attempt {
        let request = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(AUTHORIZATION, self.key.clone())
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("coinflow-fulfillment/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new());
        let request = match request {
            Ok(r) => r,
            Err(e) => return Attempt::Transport(format!("building the request: {e}")),
        };
        let exchange = async {
            let response = match self.client.request(request).await {
                Ok(r) => r,
                Err(e) => return Attempt::Transport(error_chain(&e)),
            };
            let (parts, body) = response.into_parts();
            match Limited::new(body, MAX_BODY_BYTES).collect().await {
                Ok(collected) => Attempt::Answer(parts.status, parts.headers, collected.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Attempt::TooLarge,
                Err(e) => Attempt::Transport(format!("reading the answer: {e}")),
            }
        };
        tokio::time::timeout(self.config.request_timeout, exchange)
            .await
            .unwrap_or(Attempt::Timeout)
    }

    /// `text` with the API key cut out, should a server ever echo it.
    fn scrub(&self, text: &str) -> String {
        let key = self.config.api_key.expose_secret();
        if key.is_empty() {
            text.to_owned()
        } else {
            text.replace(key, "[redacted]")
        }
    }
}

/// `Retry-After` in seconds; an HTTP-date reads as absent.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.into_owned(),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `t` in epoch milliseconds, as the payments and chargebacks lists take `since`/`until`
/// (0 before 1970).
pub fn epoch_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// RFC 3339 with milliseconds, in UTC (`2026-11-18T10:00:00.000Z`); times before 1970
/// or after 9999 are clamped to those years, which RFC 3339 can write.
pub fn iso8601(t: SystemTime) -> String {
    let latest = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let t = t.clamp(SystemTime::UNIX_EPOCH, latest);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    const KEY: &str = "cf_api_secret_4242";

    /// A request the fake API saw.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        query: Vec<(String, String)>,
        authorization: Option<String>,
    }

    impl Seen {
        fn param(&self, key: &str) -> Option<&str> {
            self.query
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    type Reply = (u16, Vec<(&'static str, String)>, String);

    /// A fake merchant API answering with `reply(request, n)` for the n-th request.
    async fn fake(
        reply: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let reply = Arc::new(reply);
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (reply, log) = (reply.clone(), log.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = Seen {
                            method: req.method().clone(),
                            path: req.uri().path().to_owned(),
                            query: req
                                .uri()
                                .query()
                                .map(|q| {
                                    url::form_urlencoded::parse(q.as_bytes())
                                        .into_owned()
                                        .collect()
                                })
                                .unwrap_or_default(),
                            authorization: req
                                .headers()
                                .get(AUTHORIZATION)
                                .map(|v| v.to_str().unwrap().to_owned()),
                        };
                        let n = {
                            let mut log = log.lock().unwrap();
                            log.push(seen.clone());
                            log.len() - 1
                        };
                        let (status, headers, body) = reply(&seen, n);
                        let mut response = http::Response::builder().status(status);
                        for (k, v) in headers {
                            response = response.header(k, v);
                        }
                        let response = response.body(Full::new(Bytes::from(body))).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    fn fast(base: &str) -> CoinflowApi {
        let mut config = ApiConfig::new(base, KEY.into());
        config.retry = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_total: Duration::from_secs(60),
        };
        config.page_limit = 10;
        CoinflowApi::new(config).unwrap()
    }

    fn delivery(id: usize, code: u16) -> serde_json::Value {
        serde_json::json!({
            "id": format!("d{id}"),
            "merchantId": "mygame",
            "eventType": "Settled",
            "category": "Purchase",
            "version": "Version 2",
            "data": {"eventType": "Settled", "category": "Purchase",
                     "created": "2026-11-18T00:00:00.000Z", "data": {"id": format!("p{id}")}},
            "sentAt": "2026-11-18T10:00:00.250Z",
            "url": "https://example.test/webhooks",
            "responseCode": code,
            "somethingNew": [1, 2, 3],
        })
    }

    /// Serves `total` deliveries, paged as asked.
    fn paged_log(total: usize) -> impl Fn(&Seen, usize) -> Reply {
        move |seen, _| {
            let page: usize = seen.param("page").unwrap().parse().unwrap();
            let limit: usize = seen.param("limit").unwrap().parse().unwrap();
            let items: Vec<_> = (0..total)
                .skip((page - 1) * limit)
                .take(limit)
                .map(|i| delivery(i, if i % 3 == 0 { 503 } else { 200 }))
                .collect();
            (200, vec![], serde_json::Value::Array(items).to_string())
        }
    }

    fn window() -> Window {
        Window {
            start: humantime::parse_rfc3339("2026-11-18T00:00:00Z").unwrap(),
            end: humantime::parse_rfc3339("2026-11-19T00:00:00Z").unwrap(),
        }
    }

    #[tokio::test]
    async fn pages_until_a_short_page() {
        let (base, seen) = fake(paged_log(25)).await;
        let all = fast(&base)
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap();
        let ids: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
        let want: Vec<String> = (0..25).map(|i| format!("d{i}")).collect();
        assert_eq!(ids, want);
        let seen = seen.lock().unwrap();
        let pages: Vec<&str> = seen.iter().map(|s| s.param("page").unwrap()).collect();
        assert_eq!(pages, ["1", "2", "3"]);
        assert!(seen.iter().all(|s| s.param("limit") == Some("10")));
        assert!(seen.iter().all(|s| s.path == "/merchant/webhooks"));
        assert_eq!(seen[0].param("startDate"), Some("2026-11-18T00:00:00.000Z"));
        assert_eq!(seen[0].param("endDate"), Some("2026-11-19T00:00:00.000Z"));
    }

    #[tokio::test]
    async fn a_full_last_page_takes_one_more_request() {
        let (base, seen) = fake(paged_log(20)).await;
        let all = fast(&base)
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 20);
        assert_eq!(seen.lock().unwrap().len(), 3, "pages 1, 2 and an empty 3");
    }

    #[tokio::test]
    async fn entries_repeated_across_pages_are_kept_once() {
        // A newest-first list that grew by one between pages repeats an entry.
        let (base, _) = fake(|seen, _| {
            let page: usize = seen.param("page").unwrap().parse().unwrap();
            let items: Vec<_> = match page {
                1 => (0..10).map(|i| delivery(i, 200)).collect(),
                2 => (9..19).map(|i| delivery(i, 200)).collect(),
                _ => (19..21).map(|i| delivery(i, 200)).collect(),
            };
            (200, vec![], serde_json::Value::Array(items).to_string())
        })
        .await;
        let all = fast(&base)
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap();
        let ids: Vec<String> = all.iter().map(|d| d.id.clone()).collect();
        let want: Vec<String> = (0..21).map(|i| format!("d{i}")).collect();
        assert_eq!(ids, want);
    }

    #[tokio::test]
    async fn a_listing_that_never_ends_is_refused() {
        let (base, seen) = fake(|_, _| {
            let items: Vec<_> = (0..10).map(|i| delivery(i, 200)).collect();
            (200, vec![], serde_json::Value::Array(items).to_string())
        })
        .await;
        let mut config = fast(&base).config().clone();
        config.max_pages = 5;
        let err = CoinflowApi::new(config)
            .unwrap()
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::TooManyPages { pages: 5, .. }),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 5);
    }

    #[tokio::test]
    async fn unacked_is_every_answer_but_200_and_filters_are_sent() {
        let (base, seen) = fake(paged_log(25)).await;
        let unacked = fast(&base)
            .unacked_deliveries(window(), Some("Card Payment Authorized"))
            .await
            .unwrap();
        let ids: Vec<String> = unacked.iter().map(|d| d.id.clone()).collect();
        let want: Vec<String> = (0..25).step_by(3).map(|i| format!("d{i}")).collect();
        assert_eq!(ids, want);
        let first = seen.lock().unwrap()[0].clone();
        assert_eq!(first.param("eventType"), Some("Card Payment Authorized"));
        assert_eq!(
            first.param("responseCode"),
            None,
            "one code only: filtered here"
        );
        let (base, seen2) = fake(paged_log(0)).await;
        fast(&base)
            .deliveries(
                window(),
                &DeliveryFilter {
                    response_code: Some(503),
                    event_type: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(seen2.lock().unwrap()[0].param("responseCode"), Some("503"));
    }

    #[tokio::test]
    async fn reads_every_kept_field() {
        let (base, _) = fake(paged_log(1)).await;
        let d = fast(&base)
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap()
            .remove(0);
        assert_eq!(d.id, "d0");
        assert_eq!(d.merchant_id.as_deref(), Some("mygame"));
        assert_eq!(d.event_type, "Settled");
        assert_eq!(d.category.as_deref(), Some("Purchase"));
        assert_eq!(d.version.as_deref(), Some("Version 2"));
        assert_eq!(d.url.as_deref(), Some("https://example.test/webhooks"));
        assert_eq!(d.response_code, Some(503));
        assert!(!d.acked());
        assert_eq!(d.payment_id().as_deref(), Some("p0"));
        let sent = d.sent_at().unwrap();
        assert_eq!(iso8601(sent), "2026-11-18T10:00:00.250Z");
        let packet: serde_json::Value = serde_json::from_str(d.data.get()).unwrap();
        assert_eq!(packet["eventType"], "Settled");
    }

    #[tokio::test]
    async fn sends_the_raw_key_and_escapes_ids() {
        let (base, seen) = fake(|_, _| (200, vec![], r#"{"jobId": 77}"#.into())).await;
        let job = fast(&format!("{base}/api"))
            .resend("log/1 x")
            .await
            .unwrap();
        assert_eq!(job, "77");
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].method, Method::POST);
        assert_eq!(seen[0].path, "/api/merchant/webhooks/log%2F1%20x");
        assert_eq!(
            seen[0].authorization.as_deref(),
            Some(KEY),
            "raw, no Bearer"
        );
    }

    #[test]
    fn backoff_doubles_within_its_bounds() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            max_total: Duration::from_secs(60),
        };
        let zero = Duration::ZERO;
        let waits: Vec<Option<Duration>> = (1..=5).map(|n| p.next_wait(n, zero, None)).collect();
        let s = |n| Some(Duration::from_secs(n));
        assert_eq!(waits, [s(1), s(2), s(4), s(5), None]);
        assert_eq!(p.next_wait(1, zero, s(30)), s(30), "Retry-After wins");
        assert_eq!(
            p.next_wait(1, Duration::from_secs(59), None),
            None,
            "over the total"
        );
        assert_eq!(
            p.next_wait(1, zero, s(61)),
            None,
            "Retry-After past the total"
        );
        assert_eq!(p.next_wait(u32::MAX - 1, zero, None), None);
        let huge = RetryPolicy {
            max_attempts: u32::MAX,
            ..p
        };
        assert_eq!(huge.next_wait(200, zero, None), s(5), "no overflow");
    }

    #[tokio::test]
    async fn retries_429_and_5xx_then_succeeds() {
        let (base, seen) = fake(|_, n| match n {
            0 => (429, vec![("retry-after", "0".into())], String::new()),
            1 => (503, vec![], String::new()),
            2 => (502, vec![], "<html>bad gateway</html>".into()),
            _ => (200, vec![], "[]".into()),
        })
        .await;
        let all = fast(&base).payments(0, 1).await.unwrap();
        assert!(all.is_empty());
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn gives_up_after_the_last_attempt() {
        let (base, seen) = fake(|_, _| (503, vec![], String::new())).await;
        let err = fast(&base).payments(0, 1).await.unwrap_err();
        match &err {
            ApiError::GaveUp { attempts, last, .. } => {
                assert_eq!(*attempts, 4);
                assert_eq!(last, "HTTP 503");
            }
            other => panic!("{other}"),
        }
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_retry_after_past_the_budget_gives_up_at_once() {
        let (base, seen) =
            fake(|_, _| (429, vec![("retry-after", "3600".into())], String::new())).await;
        let err = fast(&base).payments(0, 1).await.unwrap_err();
        assert!(matches!(err, ApiError::GaveUp { attempts: 1, .. }), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn no_connection_is_retried_then_reported() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = fast(&format!("http://{addr}"))
            .payments(0, 1)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::GaveUp { attempts: 4, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_is_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let keep = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                keep.lock().unwrap().push(stream);
            }
        });
        let mut config = fast(&format!("http://{addr}")).config().clone();
        config.request_timeout = Duration::from_millis(50);
        config.retry.max_attempts = 2;
        let err = CoinflowApi::new(config)
            .unwrap()
            .payments(0, 1)
            .await
            .unwrap_err();
        match &err {
            ApiError::GaveUp { attempts, last, .. } => {
                assert_eq!(*attempts, 2);
                assert!(last.starts_with("no answer within"), "{last}");
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn a_refused_key_is_fatal_names_the_variable_and_never_the_key() {
        for status in [401, 403] {
            let (base, seen) =
                fake(move |_, _| (status, vec![], format!(r#"{{"error":"bad key {KEY}"}}"#))).await;
            let err = fast(&base)
                .deliveries(window(), &DeliveryFilter::default())
                .await
                .unwrap_err();
            assert!(matches!(err, ApiError::Unauthorized { .. }), "{err}");
            let (text, debug) = (err.to_string(), format!("{err:?}"));
            assert!(text.contains(API_KEY_ENV), "{text}");
            assert!(text.contains(&status.to_string()), "{text}");
            assert!(
                !text.contains(KEY) && !debug.contains(KEY),
                "{text} {debug}"
            );
            assert_eq!(seen.lock().unwrap().len(), 1, "never retried");
        }
    }

    #[tokio::test]
    async fn other_client_errors_are_not_retried_and_scrub_the_key() {
        let (base, seen) = fake(|_, _| (400, vec![], format!("limit is wrong, {KEY}"))).await;
        let err = fast(&base).payments(0, 1).await.unwrap_err();
        match &err {
            ApiError::Status { status, text, .. } => {
                assert_eq!(*status, 400);
                assert_eq!(text, "limit is wrong, [redacted]");
            }
            other => panic!("{other}"),
        }
        assert!(!format!("{err} {err:?}").contains(KEY));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn resend_of_an_unknown_delivery_is_its_own_error() {
        let (base, _) = fake(|_, _| (404, vec![], r#"{"error":"not found"}"#.into())).await;
        let err = fast(&base).resend("wl-404").await.unwrap_err();
        match &err {
            ApiError::DeliveryNotFound { id } => assert_eq!(id, "wl-404"),
            other => panic!("{other}"),
        }
        assert!(fast(&base).payment("nope").await.unwrap().is_none());
        let err = fast(&base).refunds("nope").await.unwrap_err();
        assert!(matches!(err, ApiError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_answer_missing_a_field_names_it() {
        let (base, _) = fake(|_, _| (200, vec![], r#"[{"id":"d1"}]"#.into())).await;
        let err = fast(&base)
            .deliveries(window(), &DeliveryFilter::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Decode { .. }), "{err}");
        assert!(err.to_string().contains("eventType"), "{err}");
    }

    #[tokio::test]
    async fn payments_refunds_and_chargebacks_read_their_fields() {
        let (base, seen) = fake(|seen, _| {
            let body = match seen.path.as_str() {
                "/merchant/payments" => serde_json::json!([{
                    "paymentId": "p1", "createdAt": 1_795_000_000_000_i64, "status": "Settled",
                    "wallet": "mygameʬu1", "webhookInfo": {"item": "sword"},
                    "customer": {"rawCustomerId": "u1"},
                    "totals": {"subtotal": {"cents": 500, "currency": "USD"},
                               "total": {"cents": 525}},
                }]),
                "/refunds/payment/p1/all" => serde_json::json!([{
                    "paymentId": "p1", "status": "Settled",
                    "createdAt": "2026-11-18T10:00:00Z",
                    "totals": {"subtotal": {"cents": 500}},
                }]),
                _ => serde_json::json!([{
                    "chargebackId": "cb1", "paymentId": "p1", "status": "Opened",
                    "createdAt": "2026-11-18T10:00:00.000Z",
                }]),
            };
            (200, vec![], body.to_string())
        })
        .await;
        let api = fast(&base);
        let p = api.payments(10, 20).await.unwrap().remove(0);
        assert_eq!(p.payment_id, "p1");
        assert_eq!(
            p.created_at.and_then(|t| t.millis()),
            Some(1_795_000_000_000)
        );
        assert_eq!(p.status.as_deref(), Some("Settled"));
        assert_eq!(p.wallet.as_deref(), Some("mygameʬu1"));
        assert_eq!(p.webhook_info.unwrap()["item"], "sword");
        let totals = p.totals.unwrap();
        assert_eq!(totals.subtotal.unwrap().cents, 500);
        assert_eq!(totals.total.unwrap().currency, None);
        assert!(p.customer.unwrap().get().contains("u1"));
        let r = api.refunds("p1").await.unwrap().remove(0);
        assert_eq!(r.payment_id, "p1");
        assert_eq!(
            r.created_at.and_then(|t| t.millis()),
            Some(1_794_996_000_000)
        );
        let c = api.chargebacks(10, 20).await.unwrap().remove(0);
        assert_eq!(c.chargeback_id.as_deref(), Some("cb1"));
        assert_eq!(c.status.as_deref(), Some("Opened"));
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].param("since"), Some("10"));
        assert_eq!(seen[0].param("until"), Some("20"));
        assert_eq!(seen[2].path, "/merchant/chargebacks");
    }

    #[test]
    fn dates_are_written_in_utc_and_never_panic() {
        let t = humantime::parse_rfc3339("2026-11-18T10:00:00.5Z").unwrap();
        assert_eq!(iso8601(t), "2026-11-18T10:00:00.500Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(iso8601(before), "1970-01-01T00:00:00.000Z");
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(iso8601(after), "9999-12-31T23:59:59.000Z");
        assert_eq!(Timestamp::Text("nonsense".into()).millis(), None);
        assert_eq!(Timestamp::Millis(5).millis(), Some(5));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let config = ApiConfig::new("http://127.0.0.1:1", KEY.into());
        let api = CoinflowApi::new(config.clone()).unwrap();
        for text in [
            format!("{config:?}"),
            format!("{api:?}"),
            format!("{api:#?}"),
        ] {
            assert!(!text.contains(KEY), "{text}");
            assert!(text.contains("127.0.0.1"), "{text}");
        }
    }

    #[test]
    fn bad_configuration_is_refused_without_the_key() {
        for url in ["ftp://x", "not a url", "mailto:a@b", "https://u:p@x/api"] {
            let err = CoinflowApi::new(ApiConfig::new(url, KEY.into())).unwrap_err();
            assert!(matches!(err, ApiError::InvalidUrl { .. }), "{url}: {err}");
        }
        let key = format!("{KEY}\n");
        let err = CoinflowApi::new(ApiConfig::new(PRODUCTION_URL, key.into())).unwrap_err();
        assert!(matches!(err, ApiError::InvalidKey));
        assert!(err.to_string().contains(API_KEY_ENV));
        assert!(!format!("{err} {err:?}").contains(KEY));
        CoinflowApi::new(ApiConfig::new(SANDBOX_URL, KEY.into())).unwrap();
    }
}
