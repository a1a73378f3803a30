//! `bench agent`: placeholder while it is written.

use serde_json::Value;

use super::BenchOptions;

pub fn run(_options: &BenchOptions) -> anyhow::Result<Vec<Value>> {
    anyhow::bail!("bench agent is not written yet")
}
