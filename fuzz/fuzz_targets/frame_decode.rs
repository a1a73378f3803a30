#![no_main]
//! Arbitrary bytes -> incremental frame decoder -> session message decode.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_fuzz::drive::frame_decode(data);
});
