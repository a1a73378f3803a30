//! The serial shell: reads a tty with tokio-serial and feeds the line decoder.
//!
//! USB-serial adapters come and go: when a read fails or the port reaches end of file (the
//! device was unplugged), the shell reports the unterminated last line, closes the port and
//! retries opening the configured path every `reconnect_interval_ms` until it is back,
//! then resumes with a fresh decoder (the first line after a reopen is likely a fragment
//! and is counted as `partial_line`, not as garbage). Rejected lines are counted by reason
//! with a rate-limited sample in the log; they never stop the stream.
//!
//! Serial readings have nobody to acknowledge to and are not journaled (see `run.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use crate::aggregate::SourceIndex;
use crate::config::{FlowControl, Parity, SerialConfig};
use crate::metrics::SourceMetrics;
use crate::run::{now_ms, PipelineInput};
use crate::source::SerialLineReader;

fn open(config: &SerialConfig) -> tokio_serial::Result<tokio_serial::SerialStream> {
    let data_bits = match config.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match config.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = if config.stop_bits == 2 {
        tokio_serial::StopBits::Two
    } else {
        tokio_serial::StopBits::One
    };
    let flow_control = match config.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    tokio_serial::new(config.path.to_string_lossy(), config.baud_rate)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow_control)
        .open_native_async()
}

/// Runs one serial source until `stop` is cancelled.
pub async fn run_serial(
    source: SourceIndex,
    config: SerialConfig,
    metrics: Arc<SourceMetrics>,
    pipeline: mpsc::Sender<PipelineInput>,
    stop: CancellationToken,
) {
    let retry = Duration::from_millis(config.reconnect_interval_ms.max(10));
    let mut reader = SerialLineReader::new(config.line.clone());
    let mut chunk = vec![0u8; 4096];
    let pool = crate::source::ReadingsPool::new();
    let mut readings = pool.take();
    let mut logged_missing = false;
    'reopen: loop {
        let mut port = match open(&config) {
            Ok(port) => port,
            Err(error) => {
                if !logged_missing {
                    tracing::warn!(source = %metrics.name, path = %config.path.display(), %error, "cannot open serial port; retrying every {} ms", retry.as_millis());
                    logged_missing = true;
                }
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.cancelled() => break 'reopen,
                    _ = tokio::time::sleep(retry) => continue 'reopen,
                }
            }
        };
        logged_missing = false;
        metrics.connected.store(1, Ordering::Relaxed);
        tracing::info!(source = %metrics.name, path = %config.path.display(), "serial port open");
        loop {
            let read = tokio::select! {
                _ = stop.cancelled() => break 'reopen,
                read = port.read(&mut chunk) => read,
            };
            let bytes = match read {
                Ok(0) => None,
                Ok(bytes) => Some(bytes),
                Err(error) => {
                    tracing::warn!(source = %metrics.name, %error, "serial port read failed (unplugged?); reopening");
                    None
                }
            };
            let Some(bytes) = bytes else {
                metrics.connected.store(0, Ordering::Relaxed);
                if let Some(error) = reader.finish() {
                    metrics.reject(error.reason(), &error);
                }
                drop(port);
                tokio::select! {
                    _ = stop.cancelled() => break 'reopen,
                    _ = tokio::time::sleep(retry) => continue 'reopen,
                }
            };
            reader.push(chunk.get(..bytes).unwrap_or_default());
            let receive_ms = now_ms();
            while let Some(result) = reader.next_readings(&mut readings) {
                metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(_) => {
                        let input = PipelineInput {
                            source,
                            readings: std::mem::replace(&mut readings, pool.take()),
                            receive_ms,
                            durable: None,
                        };
                        if pipeline.send(input).await.is_err() {
                            break 'reopen;
                        }
                    }
                    Err(error) => {
                        readings.clear();
                        metrics.reject(error.reason(), &error);
                    }
                }
            }
        }
    }
    metrics.connected.store(0, Ordering::Relaxed);
}
