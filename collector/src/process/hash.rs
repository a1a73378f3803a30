//! A fast hasher for the engine's small integer keys.
//!
//! Why not `std`'s SipHash: the hot path does one lookup per reading and resolution, and
//! SipHash costs more than the rest of that work. Window keys are a few integers (agent
//! and series numbers the engine assigns itself, a window start); series keys, looked up
//! once per definition per batch, are short strings. The hasher multiplies each word in
//! (Fx-style) and finishes with a full 64-bit avalanche so that window starts, which are
//! multiples of the resolution, still spread over the table's low bits.
//! Accepted risk: an agent that can choose event times or series names could aim for
//! collisions; it can only slow its own partition's engine, and it must hold a valid
//! token to send at all.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Fx-style word hasher with a murmur3 finaliser.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher {
    hash: u64,
}

const MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut tail = [0u8; 8];
        let remainder = chunks.remainder();
        tail[..remainder.len()].copy_from_slice(remainder);
        self.add(u64::from_le_bytes(tail) ^ ((remainder.len() as u64) << 56));
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    #[inline]
    fn write_i64(&mut self, value: i64) {
        self.add(value as u64);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut hash = self.hash;
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^ (hash >> 33)
    }
}

/// A `HashMap` using [`FastHasher`].
pub type FastHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
