//! `tributary-collector`: command-line entry point. The logic lives in the library.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tributary_collector::config::CollectorConfig;
use tributary_collector::ingest::http::{self, HttpState};
use tributary_collector::ingest::{
    add_token, DedupStore, FleetView, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::log::{EmbeddedLog, SystemClock};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-collector",
    version,
    about = "Tributary's cloud side: QUIC ingest into a durable log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every stage in one process (today: ingest; processing joins later).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run QUIC ingest alone (for scaling ingest out).
    Ingest {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage agent tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check a config file and print every problem; exits non-zero if there is one.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Generate a token for AGENT_ID, print it once, and append its hash to the tokens file.
    Add {
        agent_id: String,
        /// The tokens file; defaults to `ingest.tokens_file` of `--config`.
        #[arg(long)]
        tokens_file: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config } | Command::Ingest { config } => run_ingest(&config),
        Command::CheckConfig { config } => {
            CollectorConfig::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Add {
                    agent_id,
                    tokens_file,
                    config,
                },
        } => {
            let path = match (tokens_file, config) {
                (Some(path), _) => path,
                (None, Some(config)) => CollectorConfig::load(&config)?.ingest.tokens_file,
                (None, None) => anyhow::bail!(
                    "say where the tokens file is: --tokens-file PATH or --config collector.toml"
                ),
            };
            let token = add_token(&path, &agent_id)?;
            eprintln!("added agent {agent_id} to {}; put this token in the agent's config (it is not shown again):", path.display());
            println!("{token}");
            Ok(())
        }
    }
}

fn run_ingest(config_path: &Path) -> anyhow::Result<()> {
    let config = CollectorConfig::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let identity = match (&config.ingest.tls.cert_file, &config.ingest.tls.key_file) {
            (Some(cert), Some(key)) => TlsIdentity::from_pem_files(cert, key)?,
            _ => {
                let (identity, generated) = TlsIdentity::load_or_generate(&config.tls_dir(), &config.ingest.tls.subject_alt_names)?;
                if generated {
                    eprintln!("generated a self-signed TLS identity in {}", config.tls_dir().display());
                }
                identity
            }
        };
        // Printed on every start so operators can always find what agents pin.
        println!("certificate fingerprint (sha256): {}", identity.fingerprint_hex());
        let tokens = TokenStore::load(&config.ingest.tokens_file)?;
        if tokens.is_empty() {
            tracing::warn!(path = %config.ingest.tokens_file.display(), "the tokens file lists no agent; every hello will be refused");
        }
        let log = Arc::new(EmbeddedLog::open(config.log_config(), SystemClock)?);
        let dedup = DedupStore::open(&config.dedup_dir(), config.ingest.dedup_window)?;
        let metrics = Arc::new(IngestMetrics::default());
        let server = IngestServer::start(IngestParts {
            config: config.ingest.clone(),
            identity,
            tokens,
            log: log.clone(),
            dedup,
            metrics: metrics.clone(),
            fleet: FleetView::new(),
        })?;
        println!("ingest listening on {}", server.local_address());
        let ready = Arc::new(AtomicBool::new(true));
        let listener = tokio::net::TcpListener::bind(config.metrics_address).await.with_context(|| {
            format!("cannot listen for HTTP on {}; change `metrics_address` or stop what uses the port", config.metrics_address)
        })?;
        let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = tokio::spawn(http::serve(listener, HttpState { metrics, ready: ready.clone() }, async move {
            let _ = http_stopped.await;
        }));
        wait_for_signal().await?;
        tracing::info!("shutting down: draining in-flight batches");
        ready.store(false, Ordering::Relaxed);
        server.shutdown().await;
        let _ = http_stop.send(());
        let _ = http_task.await;
        // Dropping the last handle stops the log's flushers after their final fsync.
        drop(log);
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
