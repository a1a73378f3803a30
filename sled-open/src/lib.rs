//! Opening a sled database that this process has just closed.
//!
//! sled releases its directory lock when the last of its background threads lets go of the
//! database, which can be a moment after the `Db` is dropped. An agent or collector that
//! closes and reopens a database in one process (a restart in place, the tests) would
//! otherwise see "could not acquire lock" for a database nobody else holds. So a lock refusal
//! is retried for a bounded time; a database really held by another process still fails,
//! after that time.

use std::time::{Duration, Instant};

/// How long a lock refusal is retried before it is reported.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Opens `config`, retrying a refused directory lock for up to [`LOCK_WAIT`].
pub fn open(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match config.open() {
            Err(sled::Error::Io(error)) if is_lock_refusal(&error) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// sled reports a refused lock as an `Other` error whose text starts "could not acquire lock"
/// (it wraps the `WouldBlock` of the flock); a bare `WouldBlock` counts too.
fn is_lock_refusal(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock
        || (error.kind() == std::io::ErrorKind::Other
            && error.to_string().starts_with("could not acquire lock"))
}
