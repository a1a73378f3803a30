//! QUIC application close codes of the `tributary/1` session.
//!
//! Why a shared list: when a collector closes a connection, the agent's reaction
//! depends on why (reconnect at once, back off, or stop and tell the operator), and a
//! close carries only a number and a short reason. Both ends name the numbers here so
//! they cannot drift apart.

/// The session ended normally (agent shutting down, or collector after a drain).
pub const CLOSE_NORMAL: u32 = 0;
/// The hello was rejected; a `Reject` message with the reason was sent first.
pub const CLOSE_REJECTED: u32 = 1;
/// The peer broke the framing or the message order (unknown frame kind, a control
/// frame on a batch stream, no hello on the first stream). Not retryable as is.
pub const CLOSE_PROTOCOL_VIOLATION: u32 = 2;
/// A newer connection of the same agent replaced this one.
pub const CLOSE_SUPERSEDED: u32 = 3;
/// The collector is shutting down; reconnect (with backoff) later or elsewhere.
pub const CLOSE_SHUTTING_DOWN: u32 = 4;
/// No hello arrived in time.
pub const CLOSE_HELLO_TIMEOUT: u32 = 5;

/// A short name for a close code, for logs and metrics.
pub fn close_code_name(code: u64) -> &'static str {
    match code {
        0 => "normal",
        1 => "rejected",
        2 => "protocol_violation",
        3 => "superseded",
        4 => "shutting_down",
        5 => "hello_timeout",
        _ => "unknown",
    }
}
