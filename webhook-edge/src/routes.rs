//! Fan-out: every event goes to each configured route that takes it. A **required**
//! route takes every event and must ack before the edge answers 200; a **best-effort**
//! route may filter by category and event type, is delivered in the background with
//! retries, never delays the 200, and may drop (drops are counted). Fulfillment is the
//! default route.
//!
//! Each route presents its own bearer token to its ingest, named in the file by
//! `token_env` (the environment variable holding it) or `token_file` (a file holding it;
//! both trimmed). `EDGE_INGEST_TOKEN` is the default route's alone: a route from a file
//! without a token sends none, so a best-effort service never sees fulfillment's token.
//!
//! ```toml
//! [[routes]]
//! name = "fulfillment"
//! endpoints = "dns://fulfillment-headless.coinflow.svc.cluster.local:50051"
//! token_env = "EDGE_FULFILLMENT_TOKEN"
//!
//! [[routes]]
//! name = "analytics"
//! endpoints = "http://analytics-a:50051,http://analytics-b:50051"
//! required = false
//! token_file = "/var/run/secrets/analytics/token"
//! categories = ["Purchase"]
//! event_types = ["Settled", "Refund"]
//! ```
//!
//! Refused at start, naming the route: a required route with filters (it would answer 200
//! for the events it skips without storing them), a best-effort route whose token is a
//! required route's, two routes of one name, a token that is missing or empty, and a file
//! without a required route.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use coinflow_shared::proto::v1::{DeliverResponse, WebhookEvent};
use opentelemetry::KeyValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::client::{DeliverError, Endpoints, IngestTarget};
use crate::observe::Metrics;

/// Background deliveries one best-effort route may have in flight; more are dropped.
const BEST_EFFORT_IN_FLIGHT: usize = 256;
/// Attempts (each with the full deadline) for a best-effort delivery.
const BEST_EFFORT_ATTEMPTS: u32 = 3;

/// One route, its token read. `Debug` never shows the token.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// `dns://host:port` or comma-separated `http://` URLs.
    pub endpoints: String,
    /// Whether the 200 waits for this route's ack.
    pub required: bool,
    /// Only these categories (all when empty); best-effort routes only.
    pub categories: Vec<String>,
    /// Only these event types (all when empty); best-effort routes only.
    pub event_types: Vec<String>,
    /// The bearer token presented to the route's ingest.
    pub token: Option<SecretString>,
}

impl RouteConfig {
    /// The route when there is no routes file: fulfillment at `endpoints`, required,
    /// presenting `token` (`EDGE_INGEST_TOKEN`).
    pub fn fulfillment(endpoints: String, token: Option<SecretString>) -> Self {
        Self {
            name: "fulfillment".into(),
            endpoints,
            required: true,
            categories: Vec::new(),
            event_types: Vec::new(),
            token,
        }
    }
}

/// One route as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: String,
    endpoints: String,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    event_types: Vec<String>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    routes: Vec<RouteEntry>,
}

/// Why routes could not be set up. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// The routes file could not be read or parsed.
    #[error("routes file {0}: {1}")]
    File(String, String),
    /// A route is invalid.
    #[error("route {0:?}: {1}")]
    Route(String, String),
    /// No route is required.
    #[error(
        "no required route: at least one route must be required, or nothing is durable \
         before the 200"
    )]
    NoRequired,
}

/// Reads a routes file and the tokens it names. [`Router::new`] checks the routes.
pub fn load(path: &Path) -> Result<Vec<RouteConfig>, RoutesError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| RoutesError::File(name.clone(), e.to_string()))?;
    let file: RoutesFile =
        toml::from_str(&text).map_err(|e| RoutesError::File(name, e.to_string()))?;
    file.routes.into_iter().map(resolve).collect()
}

/// A file's route with its token read from where the entry says.
fn resolve(entry: RouteEntry) -> Result<RouteConfig, RoutesError> {
    let bad = |why: String| RoutesError::Route(entry.name.clone(), why);
    let token = match (&entry.token_env, &entry.token_file) {
        (Some(_), Some(_)) => return Err(bad("set token_env or token_file, not both".into())),
        (Some(var), None) => Some(std::env::var(var).map_err(|_| {
            bad(format!(
                "token_env: the environment variable {var} is not set (or not UTF-8)"
            ))
        })?),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| bad(format!("token_file {}: {e}", path.display())))?,
        ),
        (None, None) => None,
    };
    let token = match token.as_deref().map(str::trim) {
        Some("") => return Err(bad("its token is empty".into())),
        Some(t) => Some(SecretString::from(t)),
        None => None,
    };
    Ok(RouteConfig {
        name: entry.name,
        endpoints: entry.endpoints,
        required: entry.required,
        categories: entry.categories,
        event_types: entry.event_types,
        token,
    })
}

/// Refuses routes that could answer 200 for an event nobody stored, or hand a
/// best-effort service a required route's token.
fn validate(routes: &[RouteConfig]) -> Result<(), RoutesError> {
    let bad = |route: &RouteConfig, why: String| RoutesError::Route(route.name.clone(), why);
    if !routes.iter().any(|r| r.required) {
        return Err(RoutesError::NoRequired);
    }
    for (i, route) in routes.iter().enumerate() {
        if routes[..i].iter().any(|r| r.name == route.name) {
            return Err(bad(route, "two routes have this name".into()));
        }
        if route.required && !(route.categories.is_empty() && route.event_types.is_empty()) {
            return Err(bad(
                route,
                "a required route takes every event: remove its categories/event_types \
                 (it would answer 200 for the events it skips without storing them), or \
                 set required = false"
                    .into(),
            ));
        }
        if route.required {
            continue;
        }
        let Some(token) = &route.token else {
            continue;
        };
        let shared = routes.iter().find(|r| {
            r.required
                && r.token
                    .as_ref()
                    .is_some_and(|t| t.expose_secret() == token.expose_secret())
        });
        if let Some(required) = shared {
            return Err(bad(
                route,
                format!(
                    "a best-effort route's token must be its own, not required route {:?}'s",
                    required.name
                ),
            ));
        }
    }
    Ok(())
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
    /// The first required route: readiness follows it, and its ack is the answer.
    primary: Route,
    /// The other required routes.
    required: Vec<Route>,
    best_effort: Vec<Route>,
    metrics: Arc<Metrics>,
}

impl Router {
    /// Checks the routes and builds a client per route.
    pub fn new(
        configs: &[RouteConfig],
        deadline: Duration,
        resolve_every: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RoutesError> {
        validate(configs)?;
        let mut required = Vec::new();
        let mut best_effort = Vec::new();
        for c in configs {
            let endpoints = Endpoints::parse(&c.endpoints)
                .map_err(|e| RoutesError::Route(c.name.clone(), e.to_string()))?;
            let target = IngestTarget::new(
                &c.name,
                &endpoints,
                deadline,
                c.token.as_ref(),
                resolve_every,
                Arc::clone(&metrics),
            )
            .map_err(|e| RoutesError::Route(c.name.clone(), e.to_string()))?;
            let route = Route {
                config: c.clone(),
                target,
                in_flight: Arc::new(Semaphore::new(BEST_EFFORT_IN_FLIGHT)),
            };
            if c.required {
                required.push(route);
            } else {
                best_effort.push(route);
            }
        }
        if required.is_empty() {
            return Err(RoutesError::NoRequired);
        }
        let primary = required.remove(0);
        Ok(Self {
            primary,
            required,
            best_effort,
            metrics,
        })
    }

    /// The first required route's target (readiness follows it).
    pub fn primary(&self) -> &IngestTarget {
        &self.primary.target
    }

    /// Sends `event` to every required route and to the best-effort routes that take it.
    /// Returns the first required route's ack once every required route acked;
    /// best-effort routes are left running.
    pub async fn deliver(&self, event: &WebhookEvent) -> Result<DeliverResponse, DeliverError> {
        for route in self.best_effort.iter().filter(|r| r.wants(event)) {
            self.spawn_best_effort(route, event);
        }
        let (first, others) = futures::future::join(
            self.primary.target.deliver(event),
            futures::future::join_all(self.required.iter().map(|r| r.target.deliver(event))),
        )
        .await;
        let ack = first?;
        for other in others {
            other?;
        }
        Ok(ack)
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
                    Err(e) if !e.is_transient() => {
                        tracing::warn!(route = target.name(), error = %e, "best-effort route refused the event");
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

    /// Writes `toml` as a routes file in `dir` and loads it.
    fn load_str(dir: &tempfile::TempDir, toml: &str) -> Result<Vec<RouteConfig>, RoutesError> {
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).unwrap();
        load(&path)
    }

    fn checked(dir: &tempfile::TempDir, toml: &str) -> Result<(), String> {
        load_str(dir, toml)
            .and_then(|routes| validate(&routes))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn routes_files_parse_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let routes = load_str(
            &dir,
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
        assert!(routes[0].required && routes[0].categories.is_empty());
        assert!(routes[0].token.is_none() && routes[1].token.is_none());
        assert_eq!(routes[1].event_types, ["Settled"]);
        assert!(validate(&routes).is_ok());
        assert!(
            load_str(
                &dir,
                "[[routes]]\nname = \"a\"\nendpoint = \"http://a:1\"\n"
            )
            .is_err()
        );
    }

    #[test]
    fn each_route_reads_its_own_token_and_debug_never_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "  secret-of-analytics\n").unwrap();
        // PATH is set wherever tests run; its value stands in for a token.
        let routes = load_str(
            &dir,
            &format!(
                r#"
                [[routes]]
                name = "fulfillment"
                endpoints = "http://f:1"
                token_env = "PATH"
                [[routes]]
                name = "analytics"
                endpoints = "http://a:1"
                required = false
                token_file = "{}"
                "#,
                token_file.display()
            ),
        )
        .unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            routes[0].token.as_ref().unwrap().expose_secret(),
            path.trim()
        );
        assert_eq!(
            routes[1].token.as_ref().unwrap().expose_secret(),
            "secret-of-analytics"
        );
        assert!(validate(&routes).is_ok());
        let debug = format!("{routes:?}");
        assert!(!debug.contains("secret-of-analytics"), "{debug}");
    }

    #[test]
    fn tokens_that_cannot_be_read_are_refused_naming_the_route() {
        let dir = tempfile::tempdir().unwrap();
        let route = |token: &str| {
            format!("[[routes]]\nname = \"billing\"\nendpoints = \"http://b:1\"\n{token}\n")
        };
        let missing = dir.path().join("nope");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        for (token, needle) in [
            (
                "token_env = \"COINFLOW_TEST_SURELY_UNSET_VARIABLE\"".to_owned(),
                "COINFLOW_TEST_SURELY_UNSET_VARIABLE is not set",
            ),
            (
                format!("token_file = \"{}\"", missing.display()),
                "token_file",
            ),
            (format!("token_file = \"{}\"", empty.display()), "empty"),
            (
                format!("token_env = \"PATH\"\ntoken_file = \"{}\"", empty.display()),
                "not both",
            ),
        ] {
            let error = load_str(&dir, &route(&token)).unwrap_err().to_string();
            assert!(
                error.contains("\"billing\"") && error.contains(needle),
                "{error}"
            );
        }
    }

    #[test]
    fn routes_that_could_lose_an_event_or_leak_a_token_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let own = dir.path().join("own");
        std::fs::write(&shared, "the-fulfillment-token").unwrap();
        std::fs::write(&own, "the-analytics-token").unwrap();
        let two = |analytics_token: &Path| {
            format!(
                r#"
                [[routes]]
                name = "fulfillment"
                endpoints = "http://f:1"
                token_file = "{}"
                [[routes]]
                name = "analytics"
                endpoints = "http://a:1"
                required = false
                token_file = "{}"
                "#,
                shared.display(),
                analytics_token.display()
            )
        };
        assert_eq!(checked(&dir, &two(&own)), Ok(()));
        let error = checked(&dir, &two(&shared)).unwrap_err();
        assert!(
            error.contains("\"analytics\"") && error.contains("\"fulfillment\"'s"),
            "{error}"
        );
        assert!(!error.contains("the-fulfillment-token"), "{error}");

        let filtered = r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "http://f:1"
            event_types = ["Settled"]
            "#;
        let error = checked(&dir, filtered).unwrap_err();
        assert!(
            error.contains("\"fulfillment\"") && error.contains("required route takes every event"),
            "{error}"
        );
        let error = checked(
            &dir,
            "[[routes]]\nname = \"f\"\nendpoints = \"http://f:1\"\ncategories = [\"Purchase\"]\n",
        )
        .unwrap_err();
        assert!(error.contains("every event"), "{error}");

        let error = checked(
            &dir,
            "[[routes]]\nname = \"a\"\nendpoints = \"http://a:1\"\nrequired = false\n",
        )
        .unwrap_err();
        assert!(error.contains("no required route"), "{error}");
        let error = checked(
            &dir,
            "[[routes]]\nname = \"a\"\nendpoints = \"http://a:1\"\n[[routes]]\nname = \"a\"\nendpoints = \"http://b:1\"\nrequired = false\n",
        )
        .unwrap_err();
        assert!(error.contains("two routes have this name"), "{error}");
    }
}
