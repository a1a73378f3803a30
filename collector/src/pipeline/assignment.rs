//! Which log partitions one processor owns.
//!
//! Static assignments (`all`, `0,2`, `1/3`) need nothing but configuration: each
//! partition's engine state lives in the store keyed by `(group, partition)`, so moving a
//! partition is a restart of both processors with new assignments. Two processors given
//! the same partition would both write it; the results would still be correct (writes
//! replace on their keys) but the work doubles. `group` makes the processor a member of
//! the Kafka consumer group instead: partitions move between live processors by
//! rebalancing (see `log::kafka_group` and `docs/pipeline.md`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::PipelineError;

/// A set of partitions: all of them, an explicit list, or "share `index` of `count`"
/// (partitions `p` with `p % count == index`), which stays right when partitions are added.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PartitionAssignment {
    #[default]
    All,
    List(Vec<u32>),
    Share {
        index: u32,
        count: u32,
    },
    /// Whatever the Kafka consumer group assigns this member, changing at rebalances.
    Group,
}

impl PartitionAssignment {
    /// The partitions to consume out of `0..partition_count`, ascending.
    pub fn resolve(&self, partition_count: u32) -> Result<Vec<u32>, PipelineError> {
        let partitions: Vec<u32> = match self {
            PartitionAssignment::All => (0..partition_count).collect(),
            PartitionAssignment::List(list) => {
                if let Some(missing) = list.iter().find(|p| **p >= partition_count) {
                    return Err(PipelineError::BadAssignment {
                        spec: self.to_string(),
                        reason: format!(
                            "partition {missing} does not exist; the log has {partition_count} (0 to {})",
                            partition_count.saturating_sub(1)
                        ),
                    });
                }
                let mut sorted = list.clone();
                sorted.sort_unstable();
                sorted.dedup();
                sorted
            }
            PartitionAssignment::Share { index, count } => (0..partition_count)
                .filter(|partition| partition % count == *index)
                .collect(),
            PartitionAssignment::Group => {
                return Err(PipelineError::BadAssignment {
                    spec: self.to_string(),
                    reason: "the consumer group assigns partitions while the processor runs"
                        .to_string(),
                })
            }
        };
        if partitions.is_empty() {
            return Err(PipelineError::BadAssignment {
                spec: self.to_string(),
                reason: format!(
                    "it selects none of the log's {partition_count} partitions; run fewer processors or add partitions"
                ),
            });
        }
        Ok(partitions)
    }
}

impl FromStr for PartitionAssignment {
    type Err = String;

    /// `all`, `0,2,5`, `INDEX/COUNT` (e.g. `1/3`) or `group`.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text == "all" {
            return Ok(PartitionAssignment::All);
        }
        if text == "group" {
            return Ok(PartitionAssignment::Group);
        }
        if let Some((index, count)) = text.split_once('/') {
            let parse = |part: &str| part.trim().parse::<u32>().ok();
            return match (parse(index), parse(count)) {
                (Some(index), Some(count)) if count > 0 && index < count => {
                    Ok(PartitionAssignment::Share { index, count })
                }
                _ => Err(format!(
                    "{text:?}: write INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 0/2 and 1/2 for two processors"
                )),
            };
        }
        let mut list = Vec::new();
        for part in text.split(',') {
            match part.trim().parse::<u32>() {
                Ok(partition) => list.push(partition),
                Err(_) => {
                    return Err(format!(
                        "{part:?} in {text:?} is not a partition number; write `all`, a list like 0,2, a share like 1/3, or `group`"
                    ))
                }
            }
        }
        Ok(PartitionAssignment::List(list))
    }
}

impl fmt::Display for PartitionAssignment {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionAssignment::All => formatter.write_str("all"),
            PartitionAssignment::List(list) => {
                let parts: Vec<String> = list.iter().map(u32::to_string).collect();
                formatter.write_str(&parts.join(","))
            }
            PartitionAssignment::Share { index, count } => write!(formatter, "{index}/{count}"),
            PartitionAssignment::Group => formatter.write_str("group"),
        }
    }
}

impl TryFrom<String> for PartitionAssignment {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<PartitionAssignment> for String {
    fn from(assignment: PartitionAssignment) -> String {
        assignment.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_shares_and_all_resolve_against_the_partition_count() {
        let parse = |text: &str| text.parse::<PartitionAssignment>().unwrap();
        assert_eq!(parse("all").resolve(3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse("2, 0,2").resolve(3).unwrap(), vec![0, 2]);
        assert_eq!(parse("1/2").resolve(5).unwrap(), vec![1, 3]);
        assert_eq!(parse("0/2").to_string(), "0/2");
        assert!(parse("3").resolve(3).is_err(), "partition 3 of 0..3");
        assert!(parse("4/5").resolve(3).is_err(), "selects nothing");
        assert!("2/2".parse::<PartitionAssignment>().is_err());
        assert!("a,b".parse::<PartitionAssignment>().is_err());
        assert_eq!(parse("group"), PartitionAssignment::Group);
        assert_eq!(parse("group").to_string(), "group");
        assert!(parse("group").resolve(3).is_err(), "the group assigns");
    }
}
