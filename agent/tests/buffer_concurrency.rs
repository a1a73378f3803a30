//! Sources appending and group-committing from several threads while a shipper
//! replays and acks: nothing is lost, nothing is counted twice, and the async flush
//! covers everything appended before it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tributary_agent::buffer::{
    BatchClass, BatchInfo, BufferConfig, DiskBuffer, Durability, ReplayOrder,
};

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor: the agent uses tokio, but the buffer must not depend on one.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        match future.as_mut().poll(&mut context) {
            Poll::Ready(output) => return output,
            Poll::Pending => std::thread::park(),
        }
    }
}

fn info(class: BatchClass) -> BatchInfo {
    BatchInfo {
        class,
        created_ms: 1,
        oldest_event_ms: 0,
        reading_count: 3,
    }
}

#[test]
fn producers_and_an_acking_shipper_agree_on_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = DiskBuffer::open(BufferConfig {
        seq_block_size: 64,
        ..BufferConfig::at(dir.path())
    })
    .unwrap();
    let produced = Arc::new(Mutex::new(Vec::new()));
    let producers_done = Arc::new(AtomicBool::new(false));

    let shipper = {
        let buffer = buffer.clone();
        let producers_done = producers_done.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let done = producers_done.load(Ordering::SeqCst);
                let mut saw_any = false;
                for item in buffer.replay(ReplayOrder::OldestFirst) {
                    let batch = item.expect("replayed batch decodes");
                    assert_eq!(batch.payload, batch.batch_seq.to_be_bytes().repeat(8));
                    buffer.ack(batch.batch_seq).unwrap();
                    acked.push(batch.batch_seq);
                    saw_any = true;
                }
                if done && !saw_any {
                    return acked;
                }
                assert!(
                    Instant::now() < deadline,
                    "shipper did not drain the buffer in time"
                );
            }
        })
    };

    let producers: Vec<_> = (0..4)
        .map(|producer| {
            let buffer = buffer.clone();
            let produced = produced.clone();
            std::thread::spawn(move || {
                let class = if producer % 2 == 0 {
                    BatchClass::Raw
                } else {
                    BatchClass::Summary
                };
                let mut group = Vec::new();
                for _ in 0..150 {
                    let batch_seq = buffer.allocate_seq().unwrap();
                    buffer
                        .append(batch_seq, info(class), &batch_seq.to_be_bytes().repeat(8))
                        .unwrap();
                    group.push(batch_seq);
                    if group.len() == 10 {
                        assert_eq!(block_on(buffer.flush_async()).unwrap(), Durability::Durable);
                        produced.lock().unwrap().append(&mut group);
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.join().unwrap();
    }
    producers_done.store(true, Ordering::SeqCst);
    let mut acked = shipper.join().unwrap();

    let mut produced = produced.lock().unwrap().clone();
    produced.sort_unstable();
    acked.sort_unstable();
    assert_eq!(produced.len(), 600);
    assert_eq!(
        acked, produced,
        "every batch is replayed and acked exactly once"
    );
    let stats = buffer.stats(1);
    assert_eq!((stats.batches_buffered, stats.bytes_used), (0, 0));
    assert_eq!(stats.acked_batches, 600);
    assert_eq!(buffer.inspect().unwrap().batches(), 0);
}

/// Group-commit latency on this machine: `cargo test -p tributary-agent --test
/// buffer_concurrency -- --ignored --nocapture`. Recorded in docs/agent-buffer.md.
#[test]
#[ignore]
fn group_commit_latency() {
    let dir =
        tempfile::tempdir_in(std::env::var("BUFFER_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let buffer = DiskBuffer::open(BufferConfig::at(dir.path())).unwrap();
    let payload = vec![7u8; 2048];
    for batches_per_group in [1usize, 10, 50] {
        let mut flush_ms = Vec::new();
        let started = Instant::now();
        let groups = 200;
        for _ in 0..groups {
            for _ in 0..batches_per_group {
                let batch_seq = buffer.allocate_seq().unwrap();
                buffer
                    .append(batch_seq, info(BatchClass::Raw), &payload)
                    .unwrap();
            }
            let flush_started = Instant::now();
            buffer.flush().unwrap();
            flush_ms.push(flush_started.elapsed().as_secs_f64() * 1e3);
        }
        let seconds = started.elapsed().as_secs_f64();
        flush_ms.sort_by(f64::total_cmp);
        let percentile =
            |fraction: f64| flush_ms[((flush_ms.len() - 1) as f64 * fraction) as usize];
        println!(
            "{{\"bench\":\"buffer_group_commit\",\"batches_per_group\":{batches_per_group},\"batch_bytes\":2048,\
             \"flush_p50_ms\":{:.3},\"flush_p99_ms\":{:.3},\"batches_per_s\":{:.0}}}",
            percentile(0.5),
            percentile(0.99),
            (groups * batches_per_group) as f64 / seconds
        );
    }
}
