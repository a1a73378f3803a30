#![no_main]
//! Arbitrary bytes -> the collector's ingest decisions (hello, then batch streams) as
//! the QUIC shell runs them, without sockets. See `src/ingest_drive.rs` for the layout.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_fuzz::ingest_drive::ingest_stream(data);
});
