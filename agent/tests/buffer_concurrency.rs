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
