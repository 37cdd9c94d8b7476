//! The gRPC client to one ingest target: a pool of endpoints (a static list, or a DNS
//! name re-resolved periodically, e.g. a Kubernetes headless Service), balanced round
//! robin. An endpoint that fails at the transport level is set aside for a while and the
//! delivery moves on to the next one. Each delivery has one deadline, well inside
//! Coinflow's 5 s, and every retry stays inside it; that is safe because ingest is
//! idempotent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use coinflow_shared::proto::v1::ingest_client::IngestClient;
use coinflow_shared::proto::v1::{DeliverRequest, DeliverResponse, WebhookEvent};
use opentelemetry::KeyValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::{Instant, sleep, timeout_at};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::observe::Metrics;

/// How long a failed endpoint is skipped.
const COOLDOWN: Duration = Duration::from_secs(2);

/// Why a delivery was not acked.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// No ack before the deadline.
    #[error("no ack within {0:?}")]
    Deadline(Duration),
    /// Ingest refused or failed; the status says why.
    #[error("ingest answered {}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The endpoint list is invalid.
    #[error("invalid ingest endpoints {0:?}: {1}")]
    BadEndpoints(String, String),
    /// The ingest token is not a valid header value.
    #[error("the ingest token must be printable ASCII")]
    BadToken,
    /// No endpoint is known yet (DNS returned nothing).
    #[error("no ingest endpoint resolved")]
    NoEndpoint,
}

/// Where a target's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// Fixed `http://host:port` URLs.
    Static(Vec<String>),
    /// `host:port`, re-resolved periodically; every address is an endpoint.
    Dns(String),
}

impl Endpoints {
    /// Parses `dns://host:port` or a comma-separated list of `http(s)://` URLs.
    pub fn parse(spec: &str) -> Result<Self, DeliverError> {
        let bad = |why: &str| DeliverError::BadEndpoints(spec.to_owned(), why.to_owned());
        if let Some(name) = spec.trim().strip_prefix("dns://") {
            return match name.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Self::Dns(name.to_owned()))
                }
                _ => Err(bad("expected dns://host:port")),
            };
        }
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(bad("no endpoint"));
        }
        for url in &urls {
            Endpoint::from_shared(url.clone()).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(Self::Static(urls))
    }
}

struct Member {
    key: String,
    client: IngestClient<Channel>,
    channel: Channel,
    down_until: Mutex<Option<Instant>>,
}

impl Member {
    fn new(key: String, url: &str, connect_timeout: Duration) -> Result<Self, DeliverError> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| DeliverError::BadEndpoints(url.to_owned(), e.to_string()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            key,
            client: IngestClient::new(channel.clone()),
            channel,
            down_until: Mutex::new(None),
        })
    }

    fn down_until(&self) -> Option<Instant> {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_down(&self, until: Option<Instant>) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }
}

/// A client of one ingest target.
#[derive(Clone)]
pub struct IngestTarget {
    name: Arc<str>,
    members: Arc<RwLock<Vec<Arc<Member>>>>,
    next: Arc<AtomicUsize>,
    deadline: Duration,
    bearer: Option<MetadataValue<Ascii>>,
    metrics: Arc<Metrics>,
}

impl IngestTarget {
    /// A lazily connecting client of `endpoints`, named `name` in metrics; each delivery
    /// gets `deadline` and, when set, `authorization: Bearer <token>`. A DNS target is
    /// re-resolved every `resolve_every` (the task must run inside a tokio runtime).
    pub fn new(
        name: &str,
        endpoints: &Endpoints,
        deadline: Duration,
        token: Option<&SecretString>,
        resolve_every: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DeliverError> {
        let bearer = token
            .map(|t| {
                let mut v = MetadataValue::try_from(format!("Bearer {}", t.expose_secret()))
                    .map_err(|_| DeliverError::BadToken)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let target = Self {
            name: name.into(),
            members: Arc::default(),
            next: Arc::default(),
            deadline,
            bearer,
            metrics,
        };
        let connect_timeout = deadline.min(Duration::from_secs(1));
        match endpoints {
            Endpoints::Static(urls) => {
                let members = urls
                    .iter()
                    .map(|u| Member::new(u.clone(), u, connect_timeout).map(Arc::new))
                    .collect::<Result<_, _>>()?;
                *target.members.write().unwrap_or_else(|p| p.into_inner()) = members;
            }
            Endpoints::Dns(name) => {
                tokio::spawn(resolve(
                    Arc::downgrade(&target.members),
                    name.clone(),
                    resolve_every,
                    connect_timeout,
                ));
            }
        }
        Ok(target)
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A channel to a live endpoint, for health checks.
    pub fn channel(&self) -> Option<Channel> {
        self.pick().map(|m| m.channel.clone())
    }

    /// The next endpoint round robin, skipping ones set aside; if all are, the one that
    /// comes back first.
    fn pick(&self) -> Option<Arc<Member>> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        if members.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..members.len())
            .map(|i| &members[(start + i) % members.len()])
            .find(|m| m.down_until().is_none_or(|t| t <= now))
            .or_else(|| members.iter().min_by_key(|m| m.down_until()))
            .cloned()
    }

    /// Delivers one event; `Ok` means the target recorded it durably.
    pub async fn deliver(&self, event: &WebhookEvent) -> Result<DeliverResponse, DeliverError> {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = Duration::from_millis(20);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DeliverError::Deadline(self.deadline));
            }
            let Some(member) = self.pick() else {
                sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_millis(250));
                if Instant::now() >= deadline {
                    return Err(DeliverError::NoEndpoint);
                }
                continue;
            };
            let span = tracing::info_span!(
                "grpc.client",
                otel.name = "coinflow.fulfillment.v1.Ingest/Deliver",
                otel.kind = "client",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = "coinflow.fulfillment.v1.Ingest",
                rpc.method = "Deliver",
                rpc.grpc.status_code = Empty,
                server.address = %member.key,
                coinflow.route = %self.name,
            );
            // With another endpoint to fall back on, one attempt may use half the budget:
            // an endpoint that hangs (a dead peer not yet noticed) must not eat it all.
            let attempt_deadline = if self.live_members() > 1 {
                Instant::now() + remaining.min(self.deadline / 2)
            } else {
                deadline
            };
            let mut request = tonic::Request::new(DeliverRequest {
                event: Some(event.clone()),
            });
            request.set_timeout(attempt_deadline.saturating_duration_since(Instant::now()));
            if let Some(bearer) = &self.bearer {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
            }
            coinflow_shared::telemetry::inject(&span, request.metadata_mut());
            let mut client = member.client.clone();
            let started = std::time::Instant::now();
            let outcome = timeout_at(attempt_deadline, client.deliver(request))
                .instrument(span.clone())
                .await;
            let code = match &outcome {
                Ok(Ok(_)) => Code::Ok,
                Ok(Err(status)) => status.code(),
                Err(_) => Code::DeadlineExceeded,
            };
            span.record("rpc.grpc.status_code", code as i32);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
            self.metrics.rpc_duration.record(
                started.elapsed().as_secs_f64(),
                &[
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", "coinflow.fulfillment.v1.Ingest"),
                    KeyValue::new("rpc.method", "Deliver"),
                    KeyValue::new("rpc.grpc.status_code", code as i64),
                    KeyValue::new("route", self.name.to_string()),
                ],
            );
            match outcome {
                Err(_) if attempt_deadline < deadline => {
                    tracing::debug!(endpoint = %member.key, "ingest attempt timed out; trying another endpoint");
                    member.set_down(Some(Instant::now() + COOLDOWN));
                }
                Err(_) => return Err(DeliverError::Deadline(self.deadline)),
                Ok(Ok(response)) => {
                    member.set_down(None);
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if retryable(status.code()) => {
                    tracing::debug!(code = %status.code(), endpoint = %member.key, "ingest transient failure; retrying");
                    if matches!(status.code(), Code::Unavailable | Code::Unknown) {
                        // The endpoint itself is likely gone: try the others first.
                        member.set_down(Some(Instant::now() + COOLDOWN));
                        if self.live_members() > 0 {
                            continue;
                        }
                    }
                    sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Ok(Err(status)) => return Err(DeliverError::Status(status)),
            }
        }
    }

    fn live_members(&self) -> usize {
        let now = Instant::now();
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|m| m.down_until().is_none_or(|t| t <= now))
            .count()
    }
}

/// Keeps `members` equal to what `name` resolves to, keeping the connections of
/// addresses that stay. Ends when the target is dropped.
async fn resolve(
    members: std::sync::Weak<RwLock<Vec<Arc<Member>>>>,
    name: String,
    every: Duration,
    connect_timeout: Duration,
) {
    loop {
        match tokio::net::lookup_host(&name).await {
            Ok(addrs) => {
                let Some(members) = members.upgrade() else {
                    return;
                };
                let mut current: BTreeMap<String, Arc<Member>> = members
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|m| (m.key.clone(), Arc::clone(m)))
                    .collect();
                let mut next = Vec::new();
                for addr in addrs {
                    let key = addr.to_string();
                    let member = match current.remove(&key) {
                        Some(m) => m,
                        None => match Member::new(
                            key.clone(),
                            &format!("http://{addr}"),
                            connect_timeout,
                        ) {
                            Ok(m) => Arc::new(m),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping a resolved address");
                                continue;
                            }
                        },
                    };
                    next.push(member);
                }
                if !next.is_empty() || current.is_empty() {
                    *members.write().unwrap_or_else(|p| p.into_inner()) = next;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, %name, "resolving ingest endpoints failed; keeping the last set")
            }
        }
        tokio::time::sleep(every).await;
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted | Code::Unknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs() {
        assert_eq!(
            Endpoints::parse("http://a:1, http://b:2").unwrap(),
            Endpoints::Static(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert_eq!(
            Endpoints::parse("dns://svc.ns:50051").unwrap(),
            Endpoints::Dns("svc.ns:50051".into())
        );
        assert!(Endpoints::parse("dns://svc").is_err());
        assert!(Endpoints::parse("").is_err());
        assert!(Endpoints::parse("not a url").is_err());
    }
}
