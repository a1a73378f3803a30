//! `tributary-sim`: simulated sensor fleets. The logic lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tributary_firmware_sim::demo::{run_demo, DemoOptions};
use tributary_firmware_sim::faults::FaultConfig;
use tributary_firmware_sim::format::MessageFormat;
use tributary_firmware_sim::ledger::{parse_json_lines, LedgerRecord};
use tributary_firmware_sim::observe::{observed_windows, parse_api_url};
use tributary_firmware_sim::run::{run, RunOptions};
use tributary_firmware_sim::sim::SimConfig;
use tributary_firmware_sim::verify::{compare, split_records};

#[derive(Parser, Debug)]
#[command(
    name = "tributary-sim",
    version,
    about = "Simulated sensor fleets for Tributary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the whole pipeline on loopback with embedded defaults (the README's first command).
    Demo(DemoArgs),
    /// Publishes a fleet's readings over MQTT (and/or a serial pty) and writes the ledger.
    Run(RunArgs),
    /// Compares a ledger with what the store holds.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Broker HOST:PORT. Without it nothing is published (serial only, or a dry run).
    #[arg(long)]
    mqtt: Option<String>,
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Readings per second per device and metric.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    #[arg(long, value_enum, default_value_t = MessageFormat::Json)]
    format: MessageFormat,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Run time in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Where to write the ground-truth ledger (JSON lines).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Ledger window width in ms.
    #[arg(long, default_value_t = 60_000)]
    window_ms: i64,
    /// Comma-separated faults: duplicates, reorder, clock-skew, unset-clock, malformed,
    /// serial-garbage, burst, disconnects, or `all`.
    #[arg(long, default_value = "")]
    faults: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also play one serial device on a pseudo-terminal (its path is printed).
    #[arg(long)]
    serial: bool,
    /// Symlink pointing at the serial device's tty.
    #[arg(long)]
    serial_link: Option<PathBuf>,
    #[arg(long, default_value = "tributary-sim")]
    client_id: String,
    /// Prepended to every topic (`PREFIX/site/...`).
    #[arg(long)]
    topic_prefix: Option<String>,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// State and logs of every process (default: a fresh directory under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 12)]
    devices: usize,
    /// Readings per second per device and metric.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Port of the dashboard and query API on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[arg(long)]
    ledger: PathBuf,
    /// Windows observed in the store, as JSON lines of `{"kind":"window",...}` records.
    #[arg(long, conflicts_with = "store")]
    observed: Option<PathBuf>,
    /// The collector's query API, `http://IP:PORT`: windows at the ledger's width are read
    /// from the store through it (embedded store or ClickHouse alike).
    #[arg(long)]
    store: Option<String>,
    /// Relative tolerance for sums and values.
    #[arg(long, default_value_t = 1e-9)]
    tolerance: f64,
}

fn read_records(path: &PathBuf) -> anyhow::Result<Vec<LedgerRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_json_lines(&text).with_context(|| format!("parsing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => run_demo(&DemoOptions {
            dir: args.dir,
            devices: args.devices,
            rate_hz: args.rate,
            http_port: args.http_port,
            duration: args
                .duration
                .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
                .map(Duration::from_secs_f64),
        }),
        Command::Run(args) => {
            let faults: FaultConfig = args.faults.parse()?;
            if !(args.duration.is_finite()
                && args.duration > 0.0
                && args.duration <= 7.0 * 86_400.0)
            {
                anyhow::bail!(
                    "--duration must be between 0 and 604800 seconds, got {}",
                    args.duration
                );
            }
            let config = SimConfig {
                devices: args.devices,
                format: args.format,
                rate_hz: args.rate,
                seed: args.seed,
                window_ms: args.window_ms,
                faults,
                serial: args.serial,
            };
            let options = RunOptions {
                mqtt_address: args.mqtt,
                qos: args.qos,
                duration_ms: (args.duration * 1000.0) as i64,
                ledger_path: args.ledger,
                serial_link: args.serial_link,
                client_id: args.client_id,
                topic_prefix: args.topic_prefix,
                drain_timeout: Duration::from_secs(30),
                stop: None,
            };
            let summary = run(config, &options, |path| {
                println!("serial device: {}", path.display());
            })?;
            println!(
                "done: {} ticks, {} MQTT messages, {} serial lines, {} reconnects, {} windowed readings",
                summary.ticks, summary.messages_published, summary.serial_lines, summary.reconnects, summary.windowed_readings
            );
            Ok(())
        }
        Command::Verify(args) => {
            let (ledger_windows, receive_timed) = split_records(read_records(&args.ledger)?);
            let observed_windows = match (args.observed, args.store) {
                (Some(path), _) => split_records(read_records(&path)?).0,
                (None, Some(url)) => {
                    let api = parse_api_url(&url)?;
                    let window_ms = ledger_windows.first().map_or(60_000, |w| w.window_ms);
                    let from_ms = ledger_windows.iter().map(|w| w.window_start_ms).min().unwrap_or(0);
                    let to_ms = ledger_windows.iter().map(|w| w.window_start_ms).max().unwrap_or(0) + window_ms;
                    // Receive-timed readings land near the run's windows: widen by an hour.
                    observed_windows(api, window_ms, from_ms - 3_600_000, to_ms + 3_600_000)?
                }
                (None, None) => anyhow::bail!("say what to compare with: --store http://IP:PORT (the collector's query API) or --observed FILE"),
            };
            let report = compare(
                &ledger_windows,
                &receive_timed,
                &observed_windows,
                args.tolerance,
            );
            print!("{}", report.render(20));
            if report.is_exact() {
                println!("exact match");
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
    }
}
