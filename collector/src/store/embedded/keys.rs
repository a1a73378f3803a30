//! Order-preserving key encoding for the embedded store.
//!
//! Why: sled keeps keys sorted bytewise, and the dashboard's queries read one series over a
//! time range. If the key bytes sort exactly like the tuple they encode (strings bytewise, as
//! ClickHouse sorts them; integers numerically), a query is one range scan and its rows come
//! out already in the order the ClickHouse queries' `ORDER BY` gives.
//!
//! - strings: every `0x00` byte is written as `0x00 0xFF`, and the string ends with
//!   `0x00 0x01`, so a shorter string sorts before its extensions and no string is a
//!   prefix-match of another's encoding;
//! - unsigned integers: big-endian;
//! - signed integers: big-endian with the sign bit flipped;
//! - floats: the IEEE bits, all flipped for negatives and the sign flipped for positives
//!   (total order; used only as part of an identity key).
//!
//! Decoding never panics: malformed bytes are `None`, which the store reports as damage.

/// Appends key parts.
#[derive(Debug, Clone, Default)]
pub struct KeyWriter {
    bytes: Vec<u8>,
}

impl KeyWriter {
    pub fn new(table: u8) -> Self {
        Self { bytes: vec![table] }
    }

    pub fn string(mut self, text: &str) -> Self {
        for byte in text.bytes() {
            self.bytes.push(byte);
            if byte == 0 {
                self.bytes.push(0xFF);
            }
        }
        self.bytes.extend_from_slice(&[0x00, 0x01]);
        self
    }

    pub fn u32(mut self, value: u32) -> Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn u64(mut self, value: u64) -> Self {
        self.bytes.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn i64(mut self, value: i64) -> Self {
        self.bytes.extend_from_slice(&ordered_i64(value));
        self
    }

    pub fn f64(mut self, value: f64) -> Self {
        let bits = value.to_bits();
        let ordered = if bits >> 63 == 1 {
            !bits
        } else {
            bits ^ (1 << 63)
        };
        self.bytes.extend_from_slice(&ordered.to_be_bytes());
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// The key bytes of a signed integer (sign bit flipped, big-endian).
pub fn ordered_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

/// Reads key parts back in the order they were written.
#[derive(Debug, Clone)]
pub struct KeyReader<'a> {
    rest: &'a [u8],
}

impl<'a> KeyReader<'a> {
    /// Starts after the table byte, which must be `table`.
    pub fn new(key: &'a [u8], table: u8) -> Option<Self> {
        match key.split_first() {
            Some((first, rest)) if *first == table => Some(Self { rest }),
            _ => None,
        }
    }

    /// How many bytes of the key have been read (including the table byte).
    pub fn consumed(&self, key: &[u8]) -> usize {
        key.len() - self.rest.len()
    }

    pub fn string(&mut self) -> Option<String> {
        let mut bytes = Vec::new();
        let mut index = 0;
        loop {
            let byte = *self.rest.get(index)?;
            if byte != 0 {
                bytes.push(byte);
                index += 1;
                continue;
            }
            match *self.rest.get(index + 1)? {
                0x01 => {
                    self.rest = self.rest.get(index + 2..)?;
                    return String::from_utf8(bytes).ok();
                }
                0xFF => {
                    bytes.push(0);
                    index += 2;
                }
                _ => return None,
            }
        }
    }

    fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.rest.split_at_checked(N)?;
        self.rest = tail;
        head.try_into().ok()
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.fixed::<4>().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.fixed::<8>().map(u64::from_be_bytes)
    }

    pub fn i64(&mut self) -> Option<i64> {
        self.fixed::<8>()
            .map(|bytes| (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
    }

    pub fn f64(&mut self) -> Option<f64> {
        let ordered = u64::from_be_bytes(self.fixed::<8>()?);
        let bits = if ordered >> 63 == 1 {
            ordered ^ (1 << 63)
        } else {
            !ordered
        };
        Some(f64::from_bits(bits))
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut successor = prefix.to_vec();
    while let Some(last) = successor.pop() {
        if last < u8::MAX {
            successor.push(last + 1);
            return Some(successor);
        }
    }
    None
}

/// Lowercase hex of a key, for error messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encoding_sorts_like_the_tuple(
            a in (".{0,6}", any::<i64>(), any::<u32>()),
            b in (".{0,6}", any::<i64>(), any::<u32>()),
        ) {
            let encode = |(text, signed, unsigned): &(String, i64, u32)| {
                KeyWriter::new(b'T').string(text).i64(*signed).u32(*unsigned).finish()
            };
            let tuple_order = (a.0.as_bytes(), a.1, a.2).cmp(&(b.0.as_bytes(), b.1, b.2));
            prop_assert_eq!(encode(&a).cmp(&encode(&b)), tuple_order);
        }

        #[test]
        fn strings_with_nul_bytes_round_trip_and_sort(
            a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(b'a'), Just(0xFFu8)], 0..6),
            b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(b'a')], 0..6),
        ) {
            // Only valid UTF-8 is stored; map 0xFF to a two-byte char to keep these valid.
            let to_text = |bytes: &[u8]| bytes.iter().map(|byte| char::from(*byte)).collect::<String>();
            let (text_a, text_b) = (to_text(&a), to_text(&b));
            let key_a = KeyWriter::new(b'T').string(&text_a).string("z").finish();
            let key_b = KeyWriter::new(b'T').string(&text_b).string("z").finish();
            prop_assert_eq!(key_a.cmp(&key_b), (text_a.as_bytes(), "z").cmp(&(text_b.as_bytes(), "z")));
            let mut reader = KeyReader::new(&key_a, b'T').expect("table byte");
            prop_assert_eq!(reader.string(), Some(text_a));
            prop_assert_eq!(reader.string(), Some("z".to_string()));
            prop_assert!(reader.is_empty());
        }

        #[test]
        fn floats_sort_and_round_trip(a in any::<f64>(), b in any::<f64>()) {
            prop_assume!(!a.is_nan() && !b.is_nan());
            let key_a = KeyWriter::new(b'T').f64(a).finish();
            let key_b = KeyWriter::new(b'T').f64(b).finish();
            if a < b { prop_assert!(key_a < key_b); }
            let mut reader = KeyReader::new(&key_a, b'T').expect("table byte");
            prop_assert_eq!(reader.f64().map(f64::to_bits), Some(a.to_bits()));
        }
    }

    #[test]
    fn malformed_keys_decode_to_none() {
        assert!(KeyReader::new(&[], b'T').is_none());
        assert!(KeyReader::new(b"X", b'T').is_none());
        let mut reader = KeyReader::new(b"Tab", b'T').expect("table byte");
        assert_eq!(reader.string(), None, "no terminator");
        let mut reader = KeyReader::new(&[b'T', 0, 7], b'T').expect("table byte");
        assert_eq!(reader.string(), None, "bad escape");
        let mut reader = KeyReader::new(&[b'T', 1, 2], b'T').expect("table byte");
        assert_eq!(reader.u64(), None, "short integer");
    }

    #[test]
    fn successor_bounds_every_extension() {
        assert_eq!(prefix_successor(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_successor(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xFF]), None);
    }
}
