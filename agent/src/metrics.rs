//! The agent's counters and their Prometheus text rendering, plus the tiny `/metrics`
//! HTTP endpoint.
//!
//! Counters are plain atomics written by the source shells and the pipeline, so bumping one
//! never blocks ingestion. Rejected input is counted by source and reason, and a sample of
//! each reason is logged at most once per [`REJECT_SAMPLE_INTERVAL`]: a sensor spewing garbage
//! costs a counter increment, not a log line per message. The HTTP endpoint is hand-written
//! (one GET, one response) to keep a web framework out of a gateway binary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::buffer::BufferStatsSnapshot;

/// At most one logged sample per source and rejection reason in this interval.
pub const REJECT_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of one source.
#[derive(Debug)]
pub struct SourceMetrics {
    pub name: String,
    pub kind: &'static str,
    pub messages_in: AtomicU64,
    pub readings_in: AtomicU64,
    /// 1 while connected (MQTT) or open (serial).
    pub connected: AtomicU64,
    pub reconnects: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, (u64, Option<Instant>)>>,
}

impl SourceMetrics {
    pub fn new(name: &str, kind: &'static str) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            messages_in: AtomicU64::new(0),
            readings_in: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            rejected: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one rejected message or line, and logs `detail` if this reason has not been
    /// sampled within [`REJECT_SAMPLE_INTERVAL`].
    pub fn reject(&self, reason: &'static str, detail: &dyn std::fmt::Display) {
        let mut rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = rejected.entry(reason).or_insert((0, None));
        entry.0 += 1;
        let now = Instant::now();
        if entry
            .1
            .is_none_or(|last| now.duration_since(last) >= REJECT_SAMPLE_INTERVAL)
        {
            entry.1 = Some(now);
            tracing::warn!(source = %self.name, reason, total = entry.0, "rejected input (sampled): {detail}");
        }
    }

    /// Rejections so far by reason.
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rejected
            .iter()
            .map(|(reason, (count, _))| (*reason, *count))
            .collect()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected().values().sum()
    }
}

/// Counters of the pipeline (aggregation, journal, group commit).
#[derive(Debug, Default)]
pub struct PipelineMetrics {
    pub batches_appended_raw: AtomicU64,
    pub batches_appended_summary: AtomicU64,
    pub bytes_appended: AtomicU64,
    pub append_errors: AtomicU64,
    pub commits: AtomicU64,
    pub commit_errors: AtomicU64,
    pub journal_entries: AtomicU64,
    pub late_readings: AtomicU64,
    pub open_windows: AtomicU64,
    pub series: AtomicU64,
    /// Series whose aggregation state is held in memory (evicted when idle).
    pub series_tracked: AtomicU64,
    pub series_evicted: AtomicU64,
    pub acks_sent: AtomicU64,
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    pub sources: Vec<Arc<SourceMetrics>>,
    pub pipeline: PipelineMetrics,
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(sources: Vec<Arc<SourceMetrics>>) -> Self {
        Self {
            sources,
            pipeline: PipelineMetrics::default(),
        }
    }

    /// Prometheus text exposition of every counter; `buffer` is the buffer's snapshot and
    /// `extra` any further lines (e.g. the shipper's counters).
    pub fn render(&self, buffer: &BufferStatsSnapshot, extra: &str) -> String {
        let mut text = String::new();
        let mut family = |name: &str, kind: &str, help: &str| {
            write_family_header(&mut text, name, kind, help);
        };
        family(
            "tributary_agent_messages_in_total",
            "counter",
            "Messages (MQTT) or lines (serial) received, by source.",
        );
        family(
            "tributary_agent_readings_in_total",
            "counter",
            "Readings parsed, by source.",
        );
        family(
            "tributary_agent_rejected_total",
            "counter",
            "Rejected messages or lines, by source and reason.",
        );
        family(
            "tributary_agent_source_connected",
            "gauge",
            "1 while the source is connected or open.",
        );
        family(
            "tributary_agent_source_reconnects_total",
            "counter",
            "Reconnects or reopen attempts, by source.",
        );
        let mut lines = String::new();
        for source in &self.sources {
            let name = escape_label(&source.name);
            let kind = source.kind;
            let _ = writeln!(
                lines,
                "tributary_agent_messages_in_total{{source=\"{name}\",kind=\"{kind}\"}} {}",
                source.messages_in.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                lines,
                "tributary_agent_readings_in_total{{source=\"{name}\",kind=\"{kind}\"}} {}",
                source.readings_in.load(Ordering::Relaxed)
            );
            for (reason, count) in source.rejected() {
                let _ = writeln!(lines, "tributary_agent_rejected_total{{source=\"{name}\",reason=\"{reason}\"}} {count}");
            }
            let _ = writeln!(
                lines,
                "tributary_agent_source_connected{{source=\"{name}\"}} {}",
                source.connected.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                lines,
                "tributary_agent_source_reconnects_total{{source=\"{name}\"}} {}",
                source.reconnects.load(Ordering::Relaxed)
            );
        }
        text.push_str(&lines);
        let pipeline = &self.pipeline;
        let counters: [(&str, &str, &str, u64); 13] = [
            (
                "tributary_agent_batches_appended_total{class=\"raw\"}",
                "counter",
                "Batches appended to the buffer.",
                pipeline.batches_appended_raw.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_batches_appended_total{class=\"summary\"}",
                "",
                "",
                pipeline.batches_appended_summary.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_bytes_appended_total",
                "counter",
                "Encoded batch bytes appended to the buffer.",
                pipeline.bytes_appended.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_append_errors_total",
                "counter",
                "Batches the buffer refused.",
                pipeline.append_errors.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_commits_total",
                "counter",
                "Group commits (journal + buffer flush).",
                pipeline.commits.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_commit_errors_total",
                "counter",
                "Group commits that failed (nothing acknowledged).",
                pipeline.commit_errors.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_journal_entries",
                "gauge",
                "Readings held in the acknowledgement journal.",
                pipeline.journal_entries.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_late_readings_total",
                "counter",
                "Readings that arrived after their window closed.",
                pipeline.late_readings.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_open_windows",
                "gauge",
                "Aggregation windows open.",
                pipeline.open_windows.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_series",
                "gauge",
                "Series known to the registry.",
                pipeline.series.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_series_tracked",
                "gauge",
                "Series with aggregation state in memory (idle ones are evicted).",
                pipeline.series_tracked.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_series_evicted_total",
                "counter",
                "Idle series whose aggregation state was dropped.",
                pipeline.series_evicted.load(Ordering::Relaxed),
            ),
            (
                "tributary_agent_mqtt_acks_total",
                "counter",
                "MQTT messages acknowledged after being made durable.",
                pipeline.acks_sent.load(Ordering::Relaxed),
            ),
        ];
        for (series, kind, help, value) in counters {
            write_sample(&mut text, series, kind, help, value);
        }
        let buffer_lines: [(&str, &str, String); 9] = [
            (
                "tributary_agent_buffer_batches",
                "gauge",
                buffer.batches_buffered.to_string(),
            ),
            (
                "tributary_agent_buffer_bytes",
                "gauge",
                buffer.bytes_used.to_string(),
            ),
            (
                "tributary_agent_buffer_memory_only",
                "gauge",
                u8::from(buffer.memory_only).to_string(),
            ),
            (
                "tributary_agent_buffer_dropped_batches_total{class=\"raw\"}",
                "counter",
                buffer.dropped_batches_raw.to_string(),
            ),
            (
                "tributary_agent_buffer_dropped_batches_total{class=\"summary\"}",
                "",
                buffer.dropped_batches_summary.to_string(),
            ),
            (
                "tributary_agent_buffer_dropped_readings_total{class=\"raw\"}",
                "counter",
                buffer.dropped_readings_raw.to_string(),
            ),
            (
                "tributary_agent_buffer_dropped_readings_total{class=\"summary\"}",
                "",
                buffer.dropped_readings_summary.to_string(),
            ),
            (
                "tributary_agent_buffer_storage_errors_total",
                "counter",
                buffer.storage_errors.to_string(),
            ),
            (
                "tributary_agent_buffer_oldest_unacked_age_seconds",
                "gauge",
                buffer
                    .oldest_unacked_age_ms
                    .map_or("0".to_owned(), |age_ms| {
                        format!("{:.3}", age_ms as f64 / 1000.0)
                    }),
            ),
        ];
        for (series, kind, value) in buffer_lines {
            write_sample(&mut text, series, kind, "", value);
        }
        text.push_str(extra);
        text
    }
}

/// `# HELP` (unless `help` is empty) and `# TYPE` of one metric family.
fn write_family_header(text: &mut String, name: &str, kind: &str, help: &str) {
    if !help.is_empty() {
        let _ = writeln!(text, "# HELP {name} {help}");
    }
    let _ = writeln!(text, "# TYPE {name} {kind}");
}

/// One sample line (`series` is the name with its labels), after its family's header when
/// `kind` is set; an empty `kind` is a further sample of the family just written.
fn write_sample(
    text: &mut String,
    series: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    if !kind.is_empty() {
        let name = series.split('{').next().unwrap_or(series);
        write_family_header(text, name, kind, help);
    }
    let _ = writeln!(text, "{series} {value}");
}

/// Serves `GET /metrics` on `listener` until `shutdown`; `render` builds the body.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let mut request = vec![0u8; 2048];
            let mut filled = 0;
            // Read the request head (bounded): we only need the request line.
            while filled < request.len() {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    stream.read(&mut request[filled..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(read)) => {
                        filled += read;
                        if request[..filled]
                            .windows(4)
                            .any(|window| window == b"\r\n\r\n")
                        {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&request[..filled]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET / ") {
                let body = render();
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 19\r\nConnection: close\r\n\r\ntry GET /metrics\r\n\r\n".to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
