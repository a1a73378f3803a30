#![no_main]
//! Arbitrary bytes -> `tributary_protocol::batch::decode_batch`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_fuzz::drive::batch_decode(data);
});
