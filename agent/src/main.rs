//! `tributary-agent`: command-line entry point. The logic lives in the library.
//!
//! - `run --config agent.toml`: run the agent until SIGINT/SIGTERM, then close windows and
//!   flush the buffer;
//! - `check-config --config agent.toml`: print every problem with its field path, exit 1 if any;
//! - `buffer inspect|verify (--config agent.toml | --path DIR)`: what is buffered, and
//!   whether every entry is intact (exit 1 if not). Stop the agent first: the buffer is
//!   locked while it runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tributary_agent::buffer::{BufferInspection, ClassInspection, DiskBuffer};
use tributary_agent::config::{AgentConfig, ConfigError};
use tributary_agent::run::{buffer_config, run_agent};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-agent",
    version,
    about = "The Tributary gateway agent: sensors in, buffered batches out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and print every problem with its field path.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Look into the disk buffer (stop the agent first).
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BufferCommand {
    /// Batches, bytes, oldest and newest per class.
    Inspect(BufferLocation),
    /// Check every entry's header and checksum.
    Verify(BufferLocation),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct BufferLocation {
    /// The agent config; the buffer is at its `buffer.path`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The buffer directory itself.
    #[arg(long)]
    path: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Before any thread starts: arenas created earlier would stay.
    let allocator = tributary_agent::allocator::tune_for_gateway();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!(?allocator, "malloc settings");
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Buffer {
            command: BufferCommand::Inspect(location),
        } => inspect(&location),
        Command::Buffer {
            command: BufferCommand::Verify(location),
        } => verify(&location),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    AgentConfig::load(path).map_err(|error| {
        anyhow::anyhow!(
            "{error}\n(run `tributary-agent check-config --config {}` for details)",
            path.display()
        )
    })
}

fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    match AgentConfig::load(path) {
        Ok(config) => {
            println!(
                "{}: OK ({} source(s), agent_id {})",
                path.display(),
                config.sources.len(),
                config.agent_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid { origin, problems }) => {
            eprintln!("{origin}: {} problem(s):", problems.len());
            for problem in problems {
                eprintln!("  {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            eprintln!("{error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    let runtime = runtime_builder()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal_shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal_shutdown.cancel();
        });
        run_agent(config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Tokio's variable for the number of worker threads; when an operator sets it, tokio's
/// own reading of it applies instead of [`AGENT_WORKER_THREADS`].
const WORKER_THREADS_VARIABLE: &str = "TOKIO_WORKER_THREADS";
/// Runtime worker threads the agent starts with.
///
/// One: the pipeline is a single task, and the sources' parsing is a fraction of its work,
/// so a second worker bought no intake rate, while the pipeline's allocations, made from
/// whichever worker ran it, grew both malloc arenas: with 10k series the agent's peak was
/// ~2 MiB higher with two workers (`docs/benchmarks.md`, "Session 7: the agent process's
/// memory"). sled's own threads write the disk buffer either way.
const AGENT_WORKER_THREADS: usize = 1;

fn runtime_builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os(WORKER_THREADS_VARIABLE).is_none() {
        builder.worker_threads(AGENT_WORKER_THREADS);
    }
    builder
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent gracefully");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn open_buffer(location: &BufferLocation) -> anyhow::Result<DiskBuffer> {
    let path = match (&location.path, &location.config) {
        (Some(path), _) => path.clone(),
        (None, Some(config)) => load(config)?.buffer.path,
        (None, None) => anyhow::bail!("give --config or --path"),
    };
    if !path.exists() {
        anyhow::bail!(
            "no buffer at {}: the directory does not exist (check buffer.path)",
            path.display()
        );
    }
    let mut config = buffer_config(&tributary_agent::config::BufferConfig {
        path: path.clone(),
        ..Default::default()
    });
    config.path = path.clone();
    DiskBuffer::open(config).with_context(|| {
        format!(
            "cannot open the buffer at {} (is the agent running? stop it first)",
            path.display()
        )
    })
}

fn format_class(name: &str, class: &ClassInspection) -> String {
    let optional = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    format!(
        "{name:<8} batches {:>8}  bytes {:>12}  readings {:>10}  seq {}..{}  created_ms {}..{}  oldest_event_ms {}  undecodable {}",
        class.batches,
        class.bytes,
        class.readings,
        optional(class.oldest_seq.map(|seq| seq.to_string())),
        optional(class.newest_seq.map(|seq| seq.to_string())),
        optional(class.oldest_created_ms.map(|ms| ms.to_string())),
        optional(class.newest_created_ms.map(|ms| ms.to_string())),
        optional(class.oldest_event_ms.map(|ms| ms.to_string())),
        class.undecodable,
    )
}

fn print_inspection(inspection: &BufferInspection) {
    println!("{}", format_class("raw", &inspection.raw));
    println!("{}", format_class("summary", &inspection.summary));
    println!(
        "total    batches {:>8}  bytes {:>12}  next_seq {}",
        inspection.batches(),
        inspection.bytes(),
        inspection.next_seq
    );
}

fn inspect(location: &BufferLocation) -> anyhow::Result<ExitCode> {
    let buffer = open_buffer(location)?;
    let inspection = buffer.inspect()?;
    print_inspection(&inspection);
    Ok(ExitCode::SUCCESS)
}

fn verify(location: &BufferLocation) -> anyhow::Result<ExitCode> {
    let buffer = open_buffer(location)?;
    let report = buffer.verify()?;
    println!("checked {} entries", report.entries_checked);
    if report.is_clean() {
        println!("all entries intact");
        return Ok(ExitCode::SUCCESS);
    }
    for bad in &report.bad_entries {
        let seq = bad
            .batch_seq
            .map_or_else(|| "?".to_owned(), |seq| seq.to_string());
        println!(
            "bad entry: seq {seq} in {}: {}",
            bad.stored_in.name(),
            bad.defect
        );
    }
    println!("{} bad entries", report.bad_entries.len());
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_starts_one_worker_unless_the_operator_says_otherwise() {
        let runtime = runtime_builder().enable_all().build().expect("runtime");
        let expected = match std::env::var(WORKER_THREADS_VARIABLE) {
            Ok(value) => value
                .trim()
                .parse()
                .expect("TOKIO_WORKER_THREADS is a number"),
            Err(_) => AGENT_WORKER_THREADS,
        };
        assert_eq!(runtime.metrics().num_workers(), expected);
    }
}
