//! Per-agent tokens, hashed at rest.
//!
//! Why hashed: the tokens file sits on the collector's disk and in backups; a leaked
//! copy must not let anyone impersonate a gateway. Tokens are 256 random bits, so a
//! plain SHA-256 is enough (no password stretching needed for high-entropy secrets).
//!
//! File format, one agent per line, `#` starts a comment:
//!
//! ```text
//! # agent_id     token hash
//! gw-0017 sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use thiserror::Error;
use tributary_protocol::session::is_valid_agent_id;

const HASH_PREFIX: &str = "sha256:";

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read the tokens file {path}: {source}; create it with `tributary-collector token add AGENT_ID`")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "tokens file {path}, line {line}: {problem}; expected `AGENT_ID sha256:<64 hex digits>`"
    )]
    Parse {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("cannot append to the tokens file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent id {agent_id:?} is not valid: use 1 to 128 ASCII letters, digits, '-', '_', '.' or ':'")]
    InvalidAgentId { agent_id: String },
    #[error("agent {agent_id} already has a token in {path}; remove its line first to replace it")]
    AlreadyPresent { agent_id: String, path: PathBuf },
    #[error("the system random number generator failed; cannot generate a token")]
    Random,
}

/// Why a hello's credentials were refused. The message goes back to the agent, so
/// it never says which of the two was wrong in a way that helps guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownAgent,
    WrongToken,
}

impl AuthFailure {
    pub fn message(self, agent_id: &str) -> String {
        match self {
            AuthFailure::UnknownAgent => format!(
                "agent {agent_id} is not in the collector's tokens file; register it with `tributary-collector token add {agent_id}`"
            ),
            AuthFailure::WrongToken => format!(
                "wrong token for agent {agent_id}; check the token in the agent's config (issue a new one with `tributary-collector token add` after removing the old line)"
            ),
        }
    }
}

/// The known agents and the SHA-256 of their tokens.
#[derive(Debug, Clone, Default)]
pub struct TokenStore {
    hashes: HashMap<String, [u8; 32]>,
}

impl TokenStore {
    /// Parses a tokens file.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a tokens file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokenError> {
        let mut hashes = HashMap::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = raw_line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let parse_error = |problem: String| TokenError::Parse {
                path: path.to_path_buf(),
                line: line_number,
                problem,
            };
            let mut fields = line.split_whitespace();
            let (Some(agent_id), Some(hash), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(parse_error("expected exactly two fields".to_owned()));
            };
            if !is_valid_agent_id(agent_id) {
                return Err(parse_error(format!("agent id {agent_id:?} is not valid")));
            }
            let Some(hex) = hash.strip_prefix(HASH_PREFIX) else {
                return Err(parse_error(format!(
                    "token hash {hash:?} does not start with {HASH_PREFIX:?}"
                )));
            };
            let digest = decode_hex_32(hex)
                .ok_or_else(|| parse_error("token hash is not 64 hex digits".to_owned()))?;
            if hashes.insert(agent_id.to_owned(), digest).is_some() {
                return Err(parse_error(format!("agent {agent_id} appears twice")));
            }
        }
        Ok(TokenStore { hashes })
    }

    /// A store from `(agent_id, token)` pairs in the clear (tests, tools).
    pub fn from_tokens<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        TokenStore {
            hashes: pairs
                .into_iter()
                .map(|(agent, token)| (agent.to_owned(), hash_token(token)))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn contains(&self, agent_id: &str) -> bool {
        self.hashes.contains_key(agent_id)
    }

    /// Checks an agent's token in constant time (for a known agent).
    pub fn verify(&self, agent_id: &str, token: &str) -> Result<(), AuthFailure> {
        let expected = self.hashes.get(agent_id).ok_or(AuthFailure::UnknownAgent)?;
        let presented = hash_token(token);
        let difference = expected
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference == 0 {
            Ok(())
        } else {
            Err(AuthFailure::WrongToken)
        }
    }
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// 32 bytes from 64 hex digits (either case; `:` separators allowed, as tools print
/// fingerprints that way).
pub fn decode_hex_32(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.bytes().filter(|byte| *byte != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let high = (pair.first().copied().map(hex_value)?)?;
        let low = (pair.get(1).copied().map(hex_value)?)?;
        *slot = high << 4 | low;
    }
    Some(out)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Generates a random token for `agent_id`, appends its hash to the tokens file
/// (created with mode 0600 if missing) and returns the token, to be shown once.
pub fn add_token(path: &Path, agent_id: &str) -> Result<String, TokenError> {
    if !is_valid_agent_id(agent_id) {
        return Err(TokenError::InvalidAgentId {
            agent_id: agent_id.to_owned(),
        });
    }
    if path.exists() {
        let store = TokenStore::load(path)?;
        if store.contains(agent_id) {
            return Err(TokenError::AlreadyPresent {
                agent_id: agent_id.to_owned(),
                path: path.to_path_buf(),
            });
        }
    }
    let mut secret = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| TokenError::Random)?;
    let token = to_hex(&secret);
    let line = format!("{agent_id} {HASH_PREFIX}{}\n", to_hex(&hash_token(&token)));
    let write_error = |source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(write_error)?;
    file.write_all(line.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_known_agents_and_refuses_the_rest() {
        let store = TokenStore::from_tokens([("gw-1", "secret")]);
        assert_eq!(store.verify("gw-1", "secret"), Ok(()));
        assert_eq!(store.verify("gw-1", "secreT"), Err(AuthFailure::WrongToken));
        assert_eq!(
            store.verify("gw-2", "secret"),
            Err(AuthFailure::UnknownAgent)
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = "# comment\n\ngw-1 sha256:00\n";
        let error = TokenStore::parse(text, Path::new("tokens")).unwrap_err();
        assert!(
            matches!(error, TokenError::Parse { line: 3, .. }),
            "{error}"
        );
        let error = TokenStore::parse("gw-1 md5:abc\n", Path::new("tokens")).unwrap_err();
        assert!(error.to_string().contains("does not start with"), "{error}");
    }

    #[test]
    fn added_tokens_verify_and_are_stored_hashed() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("tokens");
        let token = add_token(&path, "gw-7").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself is never stored");
        let store = TokenStore::load(&path).unwrap();
        assert_eq!(store.verify("gw-7", &token), Ok(()));
        assert!(matches!(
            add_token(&path, "gw-7"),
            Err(TokenError::AlreadyPresent { .. })
        ));
        assert!(matches!(
            add_token(&path, "bad id"),
            Err(TokenError::InvalidAgentId { .. })
        ));
    }
}
