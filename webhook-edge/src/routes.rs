//! Fan-out: every event goes to each configured route whose filter matches. A
//! **required** route must ack before the edge answers 200; a **best-effort** route is
//! delivered in the background with retries, never delays the 200, and may drop (drops
//! are counted). Fulfillment is the default route.
//!
//! ```toml
//! [[routes]]
//! name = "fulfillment"
//! endpoints = "dns://fulfillment-headless.coinflow.svc.cluster.local:50051"
//!
//! [[routes]]
//! name = "analytics"
//! endpoints = "http://analytics-a:50051,http://analytics-b:50051"
//! required = false
//! categories = ["Purchase"]
//! event_types = ["Settled", "Refund"]
//! ```

use std::sync::Arc;
use std::time::Duration;

use coinflow_shared::proto::v1::{DeliverResponse, WebhookEvent};
use opentelemetry::KeyValue;
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::client::{DeliverError, Endpoints, IngestTarget};
use crate::observe::Metrics;

/// Background deliveries one best-effort route may have in flight; more are dropped.
const BEST_EFFORT_IN_FLIGHT: usize = 256;
/// Attempts (each with the full deadline) for a best-effort delivery.
const BEST_EFFORT_ATTEMPTS: u32 = 3;

/// One route as configured.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// `dns://host:port` or comma-separated `http://` URLs.
    pub endpoints: String,
    /// Whether the 200 waits for this route's ack.
    #[serde(default = "yes")]
    pub required: bool,
    /// Only these categories (all when empty).
    #[serde(default)]
    pub categories: Vec<String>,
    /// Only these event types (all when empty).
    #[serde(default)]
    pub event_types: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    routes: Vec<RouteConfig>,
}

/// Why routes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The routes file could not be read or parsed.
    #[error("routes file {0}: {1}")]
    File(String, String),
    /// A route is invalid.
    #[error("route {0:?}: {1}")]
    Route(String, String),
}

/// Reads a routes file.
pub fn load(path: &std::path::Path) -> Result<Vec<RouteConfig>, RoutesError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| RoutesError::File(name.clone(), e.to_string()))?;
    let file: RoutesFile =
        toml::from_str(&text).map_err(|e| RoutesError::File(name.clone(), e.to_string()))?;
    if !file.routes.iter().any(|r| r.required) {
        return Err(RoutesError::File(
            name,
            "at least one route must be required, or nothing is durable before the 200".into(),
        ));
    }
    Ok(file.routes)
}

struct Route {
    config: RouteConfig,
    target: IngestTarget,
    in_flight: Arc<Semaphore>,
}

impl Route {
    fn wants(&self, event: &WebhookEvent) -> bool {
        let c = &self.config;
        (c.categories.is_empty() || c.categories.contains(&event.category))
            && (c.event_types.is_empty() || c.event_types.contains(&event.event_type))
    }
}

/// The configured routes.
pub struct Router {
    routes: Vec<Route>,
    metrics: Arc<Metrics>,
}

impl Router {
    /// Builds a client per route.
    pub fn new(
        configs: &[RouteConfig],
        deadline: Duration,
        token: Option<&SecretString>,
        resolve_every: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RoutesError> {
        let routes = configs
            .iter()
            .map(|c| {
                let endpoints = Endpoints::parse(&c.endpoints)
                    .map_err(|e| RoutesError::Route(c.name.clone(), e.to_string()))?;
                let target = IngestTarget::new(
                    &c.name,
                    &endpoints,
                    deadline,
                    token,
                    resolve_every,
                    Arc::clone(&metrics),
                )
                .map_err(|e| RoutesError::Route(c.name.clone(), e.to_string()))?;
                Ok(Route {
                    config: c.clone(),
                    target,
                    in_flight: Arc::new(Semaphore::new(BEST_EFFORT_IN_FLIGHT)),
                })
            })
            .collect::<Result<_, RoutesError>>()?;
        Ok(Self { routes, metrics })
    }

    /// The first required route's target (readiness follows it).
    pub fn primary(&self) -> Option<&IngestTarget> {
        self.routes
            .iter()
            .find(|r| r.config.required)
            .map(|r| &r.target)
    }

    /// Sends `event` to every matching route. Returns the ack of the first required route
    /// once every required route acked; best-effort routes are left running.
    pub async fn deliver(
        &self,
        event: &WebhookEvent,
    ) -> Result<Option<DeliverResponse>, DeliverError> {
        let mut required = Vec::new();
        for route in self.routes.iter().filter(|r| r.wants(event)) {
            if route.config.required {
                required.push(route.target.deliver(event));
            } else {
                self.spawn_best_effort(route, event);
            }
        }
        let mut first = None;
        for result in futures::future::join_all(required).await {
            let ack = result?;
            first.get_or_insert(ack);
        }
        Ok(first)
    }

    fn spawn_best_effort(&self, route: &Route, event: &WebhookEvent) {
        let drop_counter = |reason: &'static str, metrics: &Metrics, name: &str| {
            metrics.route_drops.add(
                1,
                &[
                    KeyValue::new("route", name.to_owned()),
                    KeyValue::new("reason", reason),
                ],
            );
            tracing::warn!(route = name, reason, "best-effort delivery dropped");
        };
        let Ok(permit) = Arc::clone(&route.in_flight).try_acquire_owned() else {
            drop_counter("overloaded", &self.metrics, &route.config.name);
            return;
        };
        let (target, event, metrics) = (
            route.target.clone(),
            event.clone(),
            Arc::clone(&self.metrics),
        );
        tokio::spawn(async move {
            let _permit = permit;
            for attempt in 1..=BEST_EFFORT_ATTEMPTS {
                match target.deliver(&event).await {
                    Ok(_) => return,
                    Err(DeliverError::Status(status))
                        if status.code() == tonic::Code::InvalidArgument =>
                    {
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(route = target.name(), attempt, error = %e, "best-effort delivery failed");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                }
            }
            drop_counter("failed", &metrics, target.name());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_files_parse_with_defaults_and_need_a_required_route() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(
            &path,
            r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "dns://fulfillment:50051"
            [[routes]]
            name = "analytics"
            endpoints = "http://a:1"
            required = false
            event_types = ["Settled"]
            "#,
        )
        .unwrap();
        let routes = load(&path).unwrap();
        assert!(routes[0].required && routes[0].categories.is_empty());
        assert_eq!(routes[1].event_types, ["Settled"]);
        std::fs::write(
            &path,
            "[[routes]]\nname = \"a\"\nendpoints = \"http://a:1\"\nrequired = false\n",
        )
        .unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("required"));
        std::fs::write(
            &path,
            "[[routes]]\nname = \"a\"\nendpoint = \"http://a:1\"\n",
        )
        .unwrap();
        assert!(load(&path).is_err());
    }
}
