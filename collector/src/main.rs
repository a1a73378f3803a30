//! `tributary-collector`: command-line entry point and wiring. The logic lives in the library.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::routing::get;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tributary_collector::api::{self, ApiState};
use tributary_collector::config::{CollectorConfig, LogConfig, StoreConfig};
use tributary_collector::ingest::{
    add_token, DedupStore, FleetView, IngestMetrics, IngestParts, IngestServer, TlsIdentity,
    TokenStore,
};
use tributary_collector::live::LiveFeed;
use tributary_collector::log::kafka::KafkaLog;
use tributary_collector::log::{Clock, EmbeddedLog, SystemClock};
use tributary_collector::pipeline::{
    parse_replay_start, run_consumer, validate_suffix, ConsumerConfig, ConsumerReport,
    PartitionAssignment, PipelineError, PipelineMetrics, RecordSource, RetainingStore, RunUntil,
    StartFrom,
};
use tributary_collector::store::{ClickHouseStore, EmbeddedStore, Queries, Store, StoreError};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-collector",
    version,
    about = "Tributary's cloud side: QUIC ingest, durable log, window processor, store, query API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every stage in one process: ingest, processing and the query API.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run QUIC ingest alone (for scaling ingest out).
    Ingest {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the window processor alone: the log into the store.
    Process {
        #[arg(long, short)]
        config: PathBuf,
        /// Partitions to consume: `all`, a list like `0,2`, or a share like `1/3`
        /// (overrides `process.partitions`).
        #[arg(long)]
        partitions: Option<PartitionAssignment>,
        /// Also serve the query API, the live WebSocket and the dashboard (`[api]`) from
        /// this processor: the live feed carries what this processor produces, and the
        /// agents view is empty (agents connect to ingest).
        #[arg(long)]
        api: bool,
    },
    /// Rebuild results from the log into new tables, then exit once caught up.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// Where to start: an offset (`0`), a log time in ms (`1767225600000ms`) or an
        /// RFC 3339 time (`2026-01-01T00:00:00Z`).
        #[arg(long)]
        from: String,
        /// Suffix of the new tables: ClickHouse database `<database>_<SUFFIX>`, embedded
        /// store directory `<path>-<SUFFIX>`.
        #[arg(long)]
        into: String,
        #[arg(long)]
        partitions: Option<PartitionAssignment>,
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

/// Which stages one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stages {
    ingest: bool,
    process: bool,
    api: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { config } => run(
            &config,
            Stages {
                ingest: true,
                process: true,
                api: true,
            },
            None,
        ),
        Command::Ingest { config } => run(
            &config,
            Stages {
                ingest: true,
                process: false,
                api: false,
            },
            None,
        ),
        Command::Process {
            config,
            partitions,
            api,
        } => {
            let mut config = CollectorConfig::load(&config)?;
            if let Some(partitions) = partitions {
                config.process.partitions = partitions;
            }
            runtime()?.block_on(with_log(
                config,
                Stages {
                    ingest: false,
                    process: true,
                    api,
                },
                None,
            ))
        }
        Command::Replay {
            config,
            from,
            into,
            partitions,
        } => {
            let mut config = CollectorConfig::load(&config)?;
            if let Some(partitions) = partitions {
                config.process.partitions = partitions;
            }
            let start = parse_replay_start(&from).map_err(anyhow::Error::msg)?;
            validate_suffix(&into).map_err(anyhow::Error::msg)?;
            let replay = Replay {
                start,
                suffix: into,
            };
            runtime()?.block_on(with_log(
                config,
                Stages {
                    ingest: false,
                    process: true,
                    api: false,
                },
                Some(replay),
            ))
        }
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

/// How often the store deletes rows past their retention (after a flush).
const STORE_RETENTION_INTERVAL_MS: i64 = 3_600_000;
/// How often the embedded log deletes segments past its retention.
const LOG_RETENTION_INTERVAL_MS: u64 = 60_000;

/// A replay: where it starts and the suffix of its tables.
#[derive(Debug, Clone)]
struct Replay {
    start: StartFrom,
    suffix: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(config_path: &Path, stages: Stages, replay: Option<Replay>) -> anyhow::Result<()> {
    let config = CollectorConfig::load(config_path)?;
    runtime()?.block_on(with_log(config, stages, replay))
}

/// Opens the configured log, then runs the stages over it.
async fn with_log(
    config: CollectorConfig,
    stages: Stages,
    replay: Option<Replay>,
) -> anyhow::Result<()> {
    println!("log: {}", config.log.describe());
    match &config.log {
        LogConfig::Embedded(log_config) => {
            let log = Arc::new(EmbeddedLog::open(log_config.clone(), SystemClock)?);
            // Kafka applies its topic's retention itself; the embedded log is told when.
            let retention_log = log.clone();
            let retention = tokio::spawn(async move {
                let mut interval =
                    tokio::time::interval(Duration::from_millis(LOG_RETENTION_INTERVAL_MS));
                loop {
                    interval.tick().await;
                    if let Err(error) = retention_log.enforce_retention(SystemClock.now_ms()) {
                        tracing::warn!(%error, "embedded log retention pass failed; retrying at the next interval");
                    }
                }
            });
            let result = with_store(config, log.clone(), stages, replay).await;
            retention.abort();
            let _ = retention.await;
            // Dropping the last handle stops the log's flushers after their final fsync.
            drop(log);
            result
        }
        LogConfig::Kafka(log_config) => {
            let log = Arc::new(KafkaLog::connect(log_config.clone()).await?);
            with_store(config, log, stages, replay).await
        }
    }
}

/// Opens the configured store (when processing), then runs the stages.
async fn with_store<L: RecordSource>(
    config: CollectorConfig,
    log: Arc<L>,
    stages: Stages,
    replay: Option<Replay>,
) -> anyhow::Result<()> {
    if !stages.process {
        return run_stages::<L, EmbeddedStore>(config, log, None, stages, None).await;
    }
    let store_config = match &replay {
        Some(replay) => config.store.with_suffix(&replay.suffix),
        None => config.store.clone(),
    };
    println!("store: {}", store_config.describe());
    let resolutions_ms = config.process.engine.resolutions_ms.clone();
    match store_config {
        StoreConfig::Embedded(settings) => {
            let store = EmbeddedStore::open(settings.store_config(&resolutions_ms))?;
            let queries = Queries::Embedded(store.reader());
            let store = RetainingStore::new(store, SystemClock, STORE_RETENTION_INTERVAL_MS);
            run_stages(config, log, Some((store, queries)), stages, replay).await
        }
        StoreConfig::ClickHouse(settings) => {
            let store_config = settings.store_config(&resolutions_ms);
            let mut attempt: u32 = 0;
            let store = loop {
                match ClickHouseStore::connect(store_config.clone(), SystemClock.now_ms()).await {
                    Ok(store) => break store,
                    Err(error)
                        if error.is_transient()
                            || matches!(error, StoreError::RetriesExhausted { .. }) =>
                    {
                        let delay_ms = 200_u64.saturating_mul(1 << attempt.min(5));
                        attempt += 1;
                        tracing::warn!(%error, delay_ms, "ClickHouse is not reachable yet; retrying");
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    }
                    Err(error) => return Err(error.into()),
                }
            };
            println!(
                "ClickHouse {} ({} dialect)",
                store.server_version(),
                store.dialect().name()
            );
            let queries = Queries::ClickHouse(store.reader());
            let store = RetainingStore::new(store, SystemClock, STORE_RETENTION_INTERVAL_MS);
            run_stages(config, log, Some((store, queries)), stages, replay).await
        }
    }
}

/// Starts ingest, the consumer loop and the query API as asked, and stops them on a signal
/// (or, for a replay, when the consumer caught up).
async fn run_stages<L: RecordSource, S: Store + Sync + 'static>(
    config: CollectorConfig,
    log: Arc<L>,
    store: Option<(S, Queries)>,
    stages: Stages,
    replay: Option<Replay>,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let ingest_metrics = Arc::new(IngestMetrics::default());
    let pipeline_metrics = Arc::new(PipelineMetrics::default());
    let fleet = FleetView::new();
    let live = LiveFeed::default();
    let ready = Arc::new(AtomicBool::new(false));

    let server = if stages.ingest {
        let identity = match (&config.ingest.tls.cert_file, &config.ingest.tls.key_file) {
            (Some(cert), Some(key)) => TlsIdentity::from_pem_files(cert, key)?,
            _ => {
                let (identity, generated) = TlsIdentity::load_or_generate(
                    &config.tls_dir(),
                    &config.ingest.tls.subject_alt_names,
                )?;
                if generated {
                    eprintln!(
                        "generated a self-signed TLS identity in {}",
                        config.tls_dir().display()
                    );
                }
                identity
            }
        };
        // Printed on every start so operators can always find what agents pin.
        println!(
            "certificate fingerprint (sha256): {}",
            identity.fingerprint_hex()
        );
        let tokens = TokenStore::load(&config.ingest.tokens_file)?;
        if tokens.is_empty() {
            tracing::warn!(path = %config.ingest.tokens_file.display(), "the tokens file lists no agent; every hello will be refused");
        }
        let dedup = DedupStore::open(&config.dedup_dir(), config.ingest.dedup_window)?;
        let server = IngestServer::start(IngestParts {
            config: config.ingest.clone(),
            identity,
            tokens,
            log: log.clone(),
            dedup,
            metrics: ingest_metrics.clone(),
            fleet: fleet.clone(),
        })?;
        println!("ingest listening on {}", server.local_address());
        Some(server)
    } else {
        None
    };

    let mut api_task = None;
    let mut consumer_task = None;
    if let Some((store, queries)) = store {
        if stages.api {
            let listener = tokio::net::TcpListener::bind(config.api.listen_address).await.with_context(|| {
                format!("cannot listen for the query API on {}; change `api.listen_address` or stop what uses the port", config.api.listen_address)
            })?;
            println!(
                "query API and dashboard on http://{}",
                listener.local_addr()?
            );
            let state = ApiState::new(
                queries,
                fleet.clone(),
                live.clone(),
                config.api.token.clone(),
            );
            let api_stop = stop.clone();
            api_task = Some(tokio::spawn(api::serve(listener, state, async move {
                api_stop.cancelled().await
            })));
        }
        let mut consumer_config: ConsumerConfig = config.process.consumer_config();
        if let Some(replay) = &replay {
            consumer_config.start = replay.start;
            consumer_config.until = RunUntil::CaughtUp;
            // Its own checkpoints and positions: the live group's are not touched.
            consumer_config.group = format!("{}.replay.{}", consumer_config.group, replay.suffix);
        }
        println!(
            "processing partitions {} of {} as group {}",
            consumer_config.partitions,
            log.partition_count(),
            consumer_config.group
        );
        consumer_task = Some(tokio::spawn(run_consumer(
            log.clone(),
            store,
            SystemClock,
            consumer_config,
            live.clone(),
            pipeline_metrics.clone(),
            stop.clone(),
        )));
    }

    let listener = tokio::net::TcpListener::bind(config.metrics_address)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {}; change `metrics_address` or stop what uses the port",
                config.metrics_address
            )
        })?;
    println!("metrics on http://{}/metrics", listener.local_addr()?);
    let http_task = tokio::spawn(serve_operator_http(
        listener,
        stages,
        ingest_metrics,
        pipeline_metrics,
        ready.clone(),
        stop.clone(),
    ));
    ready.store(true, Ordering::Relaxed);

    // A live processor runs until a signal; a replay also ends by itself once caught up,
    // and a consumer that failed stops the whole process.
    let mut failure = None;
    if let Some(task) = consumer_task.as_mut() {
        tokio::select! {
            result = task => {
                consumer_task = None;
                failure = finished(result);
            }
            signal = wait_for_signal() => signal?,
        }
    } else {
        wait_for_signal().await?;
    }
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    stop.cancel();
    if let Some(server) = server {
        server.shutdown().await;
    }
    if let Some(task) = consumer_task {
        if let Some(error) = finished(task.await) {
            failure.get_or_insert(error);
        }
    }
    if let Some(task) = api_task {
        let _ = task.await;
    }
    let _ = http_task.await;
    if let Some(error) = failure {
        return Err(error);
    }
    if replay.is_some() {
        println!("replay caught up");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The consumer task's error, if it ended with one.
fn finished(
    result: Result<Result<ConsumerReport, PipelineError>, tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match result {
        Ok(Ok(report)) => {
            tracing::info!(records = report.records_processed, next_offsets = ?report.next_offsets, "consumer stopped");
            None
        }
        Ok(Err(error)) => Some(anyhow::Error::new(error).context("the window processor stopped")),
        Err(error) => Some(anyhow::anyhow!("the window processor task failed: {error}")),
    }
}

/// `/metrics` (ingest and processor), `/healthz`, `/readyz` on the operators' port.
async fn serve_operator_http(
    listener: tokio::net::TcpListener,
    stages: Stages,
    ingest: Arc<IngestMetrics>,
    pipeline: Arc<PipelineMetrics>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let metrics = move || {
        let ingest = ingest.clone();
        let pipeline = pipeline.clone();
        async move {
            let mut text = String::new();
            if stages.ingest {
                text.push_str(&ingest.render());
            }
            if stages.process {
                text.push_str(&pipeline.render());
            }
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
        }
    };
    let readiness = move || {
        let ready = ready.clone();
        async move {
            if ready.load(Ordering::Relaxed) {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
    };
    let router = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
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
