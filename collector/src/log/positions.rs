//! Named consumer positions of the embedded log, one small file per group.
//!
//! Why files and not records in the log: a position is overwritten many times and
//! only the last value matters. Each commit writes the whole group file to a temporary
//! name, fsyncs it, renames it over the old one and fsyncs the directory, so after a
//! crash a group's file is either the old or the new version, never a mix.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{io_error, LogError};

const MAX_GROUP_NAME_CHARS: usize = 128;

pub(crate) struct PositionStore {
    directory: PathBuf,
    /// Cache of what is on disk, per group; the mutex also serialises commits so
    /// two commits of one group cannot interleave their renames.
    groups: Mutex<HashMap<String, BTreeMap<u32, u64>>>,
}

pub(crate) fn validate_group_name(name: &str) -> Result<(), LogError> {
    let usable = !name.is_empty()
        && name.len() <= MAX_GROUP_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name != "."
        && name != "..";
    if usable {
        Ok(())
    } else {
        Err(LogError::InvalidGroupName {
            name: name.to_owned(),
        })
    }
}

/// Text format: one `partition next_offset` pair per line. Trivial to read by eye and
/// needs no serialisation dependency.
fn parse(path: &Path, text: &str) -> Result<BTreeMap<u32, u64>, LogError> {
    let mut positions = BTreeMap::new();
    for (line_number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let parsed = match (fields.next(), fields.next(), fields.next()) {
            (Some(partition), Some(offset), None) => partition
                .parse::<u32>()
                .ok()
                .zip(offset.parse::<u64>().ok()),
            _ => None,
        };
        let Some((partition, offset)) = parsed else {
            return Err(LogError::CorruptPositions {
                path: path.to_path_buf(),
                reason: format!(
                    "line {} is {line:?}, expected `partition next_offset`",
                    line_number + 1
                ),
            });
        };
        positions.insert(partition, offset);
    }
    Ok(positions)
}

pub(crate) fn sync_directory(directory: &Path) -> Result<(), LogError> {
    let handle =
        fs::File::open(directory).map_err(io_error("open directory for fsync", directory))?;
    handle
        .sync_all()
        .map_err(io_error("fsync directory", directory))
}

impl PositionStore {
    pub(crate) fn open(directory: PathBuf) -> Result<Self, LogError> {
        fs::create_dir_all(&directory).map_err(io_error("create directory", &directory))?;
        Ok(Self {
            directory,
            groups: Mutex::new(HashMap::new()),
        })
    }

    fn group_path(&self, group: &str) -> PathBuf {
        self.directory.join(format!("{group}.positions"))
    }

    fn load_group<'a>(
        &self,
        groups: &'a mut HashMap<String, BTreeMap<u32, u64>>,
        group: &str,
    ) -> Result<&'a mut BTreeMap<u32, u64>, LogError> {
        if !groups.contains_key(group) {
            let path = self.group_path(group);
            let positions = match fs::read_to_string(&path) {
                Ok(text) => parse(&path, &text)?,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(source) => {
                    return Err(LogError::Io {
                        action: "read",
                        path,
                        source,
                    })
                }
            };
            groups.insert(group.to_owned(), positions);
        }
        groups.get_mut(group).ok_or(LogError::Closed)
    }

    pub(crate) fn load(&self, group: &str, partition: u32) -> Result<Option<u64>, LogError> {
        validate_group_name(group)?;
        let mut groups = self.groups.lock().map_err(|_| LogError::Closed)?;
        Ok(self
            .load_group(&mut groups, group)?
            .get(&partition)
            .copied())
    }

    pub(crate) fn commit(
        &self,
        group: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), LogError> {
        validate_group_name(group)?;
        let mut groups = self.groups.lock().map_err(|_| LogError::Closed)?;
        let positions = self.load_group(&mut groups, group)?;
        let mut updated = positions.clone();
        updated.insert(partition, next_offset);
        let mut text = String::new();
        for (partition, offset) in &updated {
            text.push_str(&format!("{partition} {offset}\n"));
        }
        let final_path = self.group_path(group);
        let temporary_path = self.directory.join(format!("{group}.positions.tmp"));
        let mut file =
            fs::File::create(&temporary_path).map_err(io_error("create", &temporary_path))?;
        file.write_all(text.as_bytes())
            .map_err(io_error("write", &temporary_path))?;
        file.sync_all()
            .map_err(io_error("fsync", &temporary_path))?;
        drop(file);
        fs::rename(&temporary_path, &final_path)
            .map_err(io_error("rename into place", &final_path))?;
        sync_directory(&self.directory)?;
        *positions = updated;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_checked() {
        assert!(validate_group_name("processor-1.v2_a").is_ok());
        for bad in ["", ".", "..", "a/b", "ä", &"x".repeat(129)] {
            assert!(
                validate_group_name(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn parse_rejects_garbage_with_line_number() {
        let path = Path::new("g.positions");
        assert_eq!(
            parse(path, "0 5\n3 9\n").ok(),
            Some(BTreeMap::from([(0, 5), (3, 9)]))
        );
        let error = parse(path, "0 5\nbroken\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("line 2"), "{error}");
    }
}
