//! The fleet view: what ingest knows about each agent, for the query API.
//!
//! Why here: ingest is the only component that sees agents directly (their hellos,
//! addresses, backlogs and batches), and operators ask "which gateways are behind,
//! and by how much?" before anything else. A shared map behind a lock is enough: it
//! changes once per batch per agent and is read rarely.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tributary_protocol::session::Backlog;

/// One agent as ingest saw it last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub agent_id: String,
    pub connected: bool,
    pub agent_version: String,
    pub remote_address: SocketAddr,
    /// Wall-clock time of the last hello or batch, ms since the Unix epoch.
    pub last_seen_ms: i64,
    pub connected_since_ms: i64,
    /// The backlog the agent reported in its last hello.
    pub reported_backlog: Backlog,
    pub batches_acked: u64,
    pub readings_acked: u64,
    pub duplicates: u64,
    /// Highest batch sequence acked in this process's lifetime.
    pub highest_acked_seq: Option<u64>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    agents: Arc<RwLock<BTreeMap<String, AgentStatus>>>,
}

impl FleetView {
    pub fn new() -> Self {
        Self::default()
    }

    /// All agents seen since start, by id.
    pub fn snapshot(&self) -> Vec<AgentStatus> {
        self.read(|agents| agents.values().cloned().collect())
    }

    pub fn agent(&self, agent_id: &str) -> Option<AgentStatus> {
        self.read(|agents| agents.get(agent_id).cloned())
    }

    pub fn connected_count(&self) -> usize {
        self.read(|agents| agents.values().filter(|agent| agent.connected).count())
    }

    pub(crate) fn on_hello(
        &self,
        agent_id: &str,
        agent_version: &str,
        remote_address: SocketAddr,
        backlog: Backlog,
        now_ms: i64,
    ) {
        self.write(|agents| {
            let entry = agents
                .entry(agent_id.to_owned())
                .or_insert_with(|| AgentStatus {
                    agent_id: agent_id.to_owned(),
                    connected: true,
                    agent_version: String::new(),
                    remote_address,
                    last_seen_ms: now_ms,
                    connected_since_ms: now_ms,
                    reported_backlog: backlog,
                    batches_acked: 0,
                    readings_acked: 0,
                    duplicates: 0,
                    highest_acked_seq: None,
                });
            entry.connected = true;
            entry.agent_version = agent_version.to_owned();
            entry.remote_address = remote_address;
            entry.last_seen_ms = now_ms;
            entry.connected_since_ms = now_ms;
            entry.reported_backlog = backlog;
        });
    }

    pub(crate) fn on_batch(
        &self,
        agent_id: &str,
        batch_seq: u64,
        readings: u64,
        duplicate: bool,
        remote_address: SocketAddr,
        now_ms: i64,
    ) {
        self.write(|agents| {
            if let Some(entry) = agents.get_mut(agent_id) {
                entry.last_seen_ms = now_ms;
                entry.remote_address = remote_address;
                if duplicate {
                    entry.duplicates += 1;
                } else {
                    entry.batches_acked += 1;
                    entry.readings_acked += readings;
                }
                entry.highest_acked_seq = Some(
                    entry
                        .highest_acked_seq
                        .map_or(batch_seq, |seq| seq.max(batch_seq)),
                );
            }
        });
    }

    pub(crate) fn on_disconnect(&self, agent_id: &str, now_ms: i64) {
        self.write(|agents| {
            if let Some(entry) = agents.get_mut(agent_id) {
                entry.connected = false;
                entry.last_seen_ms = now_ms;
            }
        });
    }

    fn read<T>(&self, read: impl FnOnce(&BTreeMap<String, AgentStatus>) -> T) -> T {
        read(
            &self
                .agents
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    fn write(&self, write: impl FnOnce(&mut BTreeMap<String, AgentStatus>)) {
        write(
            &mut self
                .agents
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}
