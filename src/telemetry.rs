//! Logging and tracing, set up once per process. Logs go to stderr so that
//! commands that print data (`msys events tail`) keep stdout clean.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Our own logs at info; the libraries' chatter (tokio-postgres NOTICEs,
/// librdkafka's reconnect attempts) only when it is a warning or worse.
const DEFAULT_FILTER: &str = "info,tokio_postgres=warn,librdkafka=warn,rdkafka=warn";

/// Installs the global subscriber. `RUST_LOG` replaces the default filter.
/// Calling it twice is harmless: the second call keeps the first subscriber,
/// which is what tests that start several roles in one process need.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => {
            registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).try_init()
        }
    };
    // Err only means a subscriber is already installed.
    let _ = result;
}
