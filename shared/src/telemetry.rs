//! The tracing subscriber both services use. It is built and returned, not installed, so
//! `main` decides and tests stay free of global state.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt};

use crate::config::LogFormat;

/// Builds a subscriber writing to stderr. `RUST_LOG` overrides `default_filter`.
pub fn subscriber(format: LogFormat, default_filter: &str) -> Box<dyn Subscriber + Send + Sync> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        Box::new(
            registry.with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            ),
        )
    } else {
        Box::new(registry.with(fmt::layer().with_writer(std::io::stderr)))
    }
}
