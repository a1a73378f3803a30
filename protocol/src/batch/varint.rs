//! LEB128 varints and zigzag, the integer encoding of every batch column.
//!
//! Hand-written rather than borrowed from postcard because the column decoders run
//! once per reading: they must be branch-light, never allocate, and report
//! truncation as a typed error naming the column being read.
//!
//! The writers are public so that the agent's own stored formats (the series registry's
//! packed keys, the acknowledgement journal's blocks) encode integers the same way; their
//! readers report defects in their own error types.

use super::BatchError;

/// Appends `value` as an unsigned LEB128 varint (1 to 10 bytes).
#[inline]
pub fn write_u64(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline]
pub fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

#[inline]
pub fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[inline]
pub fn write_i64(out: &mut Vec<u8>, value: i64) {
    write_u64(out, zigzag(value));
}

/// A cursor over one column of untrusted bytes. Every read is bounds-checked and
/// names `column` in its error.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    column: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], column: &'static str) -> Self {
        Self {
            bytes,
            position: 0,
            column,
        }
    }

    pub(crate) fn column(&self) -> &'static str {
        self.column
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.position >= self.bytes.len()
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.bytes.get(self.position..).unwrap_or(&[])
    }

    fn truncated(&self) -> BatchError {
        BatchError::Truncated {
            section: self.column,
        }
    }

    #[inline]
    pub(crate) fn read_u64(&mut self) -> Result<u64, BatchError> {
        // Fast paths: one- and two-byte varints dominate (deltas, small ids, the
        // first value of a run of quantised readings).
        match self
            .bytes
            .get(self.position..self.position.saturating_add(2))
        {
            Some(&[first, _]) if first < 0x80 => {
                self.position += 1;
                return Ok(u64::from(first));
            }
            Some(&[first, second]) if second < 0x80 => {
                self.position += 2;
                return Ok(u64::from(first & 0x7f) | (u64::from(second) << 7));
            }
            _ => {}
        }
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&byte) = self.bytes.get(self.position) else {
                return Err(self.truncated());
            };
            self.position += 1;
            if shift == 63 && byte > 1 {
                return Err(BatchError::VarintOverflow {
                    section: self.column,
                });
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(BatchError::VarintOverflow {
                    section: self.column,
                });
            }
        }
    }

    #[inline]
    pub(crate) fn read_i64(&mut self) -> Result<i64, BatchError> {
        self.read_u64().map(unzigzag)
    }

    /// Reads a varint that counts or sizes something, as a `usize`.
    pub(crate) fn read_usize(&mut self) -> Result<usize, BatchError> {
        let value = self.read_u64()?;
        usize::try_from(value).map_err(|_| BatchError::VarintOverflow {
            section: self.column,
        })
    }

    #[inline]
    pub(crate) fn read_u8(&mut self) -> Result<u8, BatchError> {
        let Some(&byte) = self.bytes.get(self.position) else {
            return Err(self.truncated());
        };
        self.position += 1;
        Ok(byte)
    }

    #[inline]
    pub(crate) fn read_u64_be(&mut self) -> Result<u64, BatchError> {
        let end = self
            .position
            .checked_add(8)
            .ok_or_else(|| self.truncated())?;
        let Some(chunk) = self.bytes.get(self.position..end) else {
            return Err(self.truncated());
        };
        let mut array = [0u8; 8];
        array.copy_from_slice(chunk);
        self.position = end;
        Ok(u64::from_be_bytes(array))
    }

    /// Takes the next `length` bytes as a sub-slice.
    pub(crate) fn take(&mut self, length: usize) -> Result<&'a [u8], BatchError> {
        let end = self
            .position
            .checked_add(length)
            .ok_or_else(|| self.truncated())?;
        let Some(chunk) = self.bytes.get(self.position..end) else {
            return Err(self.truncated());
        };
        self.position = end;
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_extremes() {
        for value in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, value);
            assert_eq!(Reader::new(&out, "test").read_u64().ok(), Some(value));
        }
        for value in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        let overlong = [0xffu8; 11];
        assert!(matches!(
            Reader::new(&overlong, "test").read_u64(),
            Err(BatchError::VarintOverflow { .. })
        ));
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&too_big, "test").read_u64().is_err());
        assert!(matches!(
            Reader::new(&[0x80], "test").read_u64(),
            Err(BatchError::Truncated { .. })
        ));
    }
}
