//! `collector.toml`: the collector's configuration file.
//!
//! Why one file with sections: `serve` runs every stage in one process and each stage
//! reads its own section; `ingest` reads only what ingest needs. Unknown fields are
//! errors so a typo never silently falls back to a default. The documented example,
//! `collector/collector.example.toml`, is parsed by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::ingest::IngestConfig;
use crate::log::EmbeddedLogConfig;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Where the collector keeps its state: the generated TLS identity (`tls/`), the
    /// duplicate-detection state (`dedup/`) and, unless `[log]` says otherwise, the
    /// embedded log (`log/`).
    pub state_dir: PathBuf,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    #[serde(default)]
    pub ingest: IngestConfig,
    /// The embedded log; defaults to `<state_dir>/log` with default settings.
    #[serde(default)]
    pub log: Option<EmbeddedLogConfig>,
}

fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has problems:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl CollectorConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: CollectorConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Every problem with the settings, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.ingest.problems();
        if let Err(error) = self.log_config().validate() {
            problems.push(format!("log: {error}"));
        }
        problems
    }

    /// The embedded log's settings, with the default directory filled in.
    pub fn log_config(&self) -> EmbeddedLogConfig {
        self.log
            .clone()
            .unwrap_or_else(|| EmbeddedLogConfig::new(self.state_dir.join("log")))
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    pub fn dedup_dir(&self) -> PathBuf {
        self.state_dir.join("dedup")
    }
}
