//! A token bucket for per-agent byte rates, sans-IO (time is an argument).
//!
//! Why debt instead of refusal: a batch over the rate is still taken, the agent just
//! waits before its next one is read. Refusing would make it resend the same bytes.

/// Bytes per second with a burst of one second's worth.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    bytes_per_second: u64,
    tokens: f64,
    last_ms: Option<i64>,
}

impl TokenBucket {
    pub fn new(bytes_per_second: u64) -> Self {
        TokenBucket {
            bytes_per_second: bytes_per_second.max(1),
            tokens: bytes_per_second as f64,
            last_ms: None,
        }
    }

    /// Takes `bytes` at `now_ms`; returns how long the caller should wait before
    /// taking more (0 while within the rate).
    pub fn take(&mut self, bytes: u64, now_ms: i64) -> u64 {
        let rate = self.bytes_per_second as f64;
        if let Some(last_ms) = self.last_ms {
            let elapsed_ms = now_ms.saturating_sub(last_ms).max(0) as f64;
            self.tokens = (self.tokens + elapsed_ms * rate / 1000.0).min(rate);
        }
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(now_ms)));
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            0
        } else {
            (-self.tokens * 1000.0 / rate).ceil() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_up_to_one_second_then_asks_to_wait() {
        let mut bucket = TokenBucket::new(1000);
        assert_eq!(bucket.take(600, 0), 0);
        assert_eq!(bucket.take(400, 0), 0);
        assert_eq!(bucket.take(500, 0), 500);
        // 1 s later the debt of 500 is repaid and 500 more accrued.
        assert_eq!(bucket.take(500, 1000), 0);
        assert_eq!(bucket.take(1, 1000), 1);
    }
}
