//! The ClickHouse store: a thin async shell around [`PendingWrites`] and the SQL of
//! [`schema`](super::schema).
//!
//! Why it is shaped this way: ClickHouse wants few large inserts (each insert makes a part),
//! the dashboard wants fresh data, and the log offsets may only be committed once rows are
//! durable. So writes buffer until the batch policy says flush (rows or age); a flush inserts
//! one block per table and retries a failed block with exponential backoff, resending exactly
//! the same rows. A block that did land before its acknowledgement was lost is harmless: the
//! tables replace on their keys and every query reads `FINAL`; on modern servers the block
//! also carries an `insert_deduplication_token` (a hash of its rows), so the server drops the
//! second copy at once.
//!
//! The server's version is detected at [`ClickHouseStore::connect`]; the schema is created
//! or checked there (idempotent). Servers without `TTL` get retention from
//! [`ClickHouseStore::drop_expired_partitions`], which the caller runs periodically.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::clickhouse::{Client, Row, RowOwned, RowRead, RowWrite};
use serde::{Deserialize, Serialize};

use super::schema::{
    self, Dialect, SchemaConfig, SeriesSelector, CHECKPOINTS_TABLE, LAST_SEEN_TABLE, LATE_TABLE,
    RAW_TABLE,
};
use super::{
    BatchPolicy, Checkpoint, DeviceRow, FlushReport, LastSeenRow, LateCountRow, LatestValueRow,
    PendingWrites, RawReadingRow, RetryPolicy, RollupRow, SeriesRow, Store, StoreError,
};
use crate::process::{LateReading, WindowResult};

/// How to reach ClickHouse and how to write to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseStoreConfig {
    /// The HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub schema: SchemaConfig,
    pub batch: BatchPolicy,
    pub retry: RetryPolicy,
    /// Upper bound on one insert or query round trip.
    pub request_timeout_ms: u64,
}

impl Default for ClickHouseStoreConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".to_string(),
            user: None,
            password: None,
            schema: SchemaConfig::default(),
            batch: BatchPolicy::default(),
            retry: RetryPolicy::default(),
            request_timeout_ms: 30_000,
        }
    }
}

/// The ClickHouse implementation of [`Store`], plus the dashboard's queries (through
/// [`ClickHouseStore::reader`]).
pub struct ClickHouseStore {
    reader: ClickHouseReader,
    /// Bound to the store's database: the insert API quotes the table name as one identifier.
    insert_client: Client,
    config: ClickHouseStoreConfig,
    dialect: Dialect,
    server_version: String,
    resolutions_ms: Vec<i64>,
    pending: PendingWrites,
    /// The last checkpoint version written (see [`next_checkpoint_version`]).
    last_checkpoint_version: u64,
}

/// The read side: the dashboard's queries and checkpoint loads. Cheap to clone (the HTTP
/// client is shared), usable while the store writes.
#[derive(Clone)]
pub struct ClickHouseReader {
    /// Behind an `Arc`: the client is large and `Queries` holds either reader by value.
    client: Arc<Client>,
    url: Arc<str>,
    database: Arc<str>,
    resolutions_ms: Arc<[i64]>,
    finest_resolution_ms: Option<i64>,
    request_timeout_ms: u64,
}

/// A stored checkpoint, as the `checkpoints` table holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Row)]
pub struct CheckpointRow {
    pub consumer_group: String,
    pub log_partition: u32,
    pub next_offset: u64,
    #[serde(with = "super::bytes_column")]
    pub engine_state: Vec<u8>,
    /// Higher wins; see [`next_checkpoint_version`].
    pub saved_version: u64,
}

impl CheckpointRow {
    pub fn into_checkpoint(self) -> Checkpoint {
        Checkpoint {
            group: self.consumer_group,
            partition: self.log_partition,
            next_offset: self.next_offset,
            engine_state: self.engine_state,
        }
    }
}

/// The version of the next checkpoint insert: above every earlier one of this store and of
/// the database, and at least the wall clock in microseconds, so that after a rebalance the
/// newest owner's checkpoint of a partition wins over an older owner's even though the two
/// processes count separately. The offset is not used: a replay moves it backwards.
pub fn next_checkpoint_version(last_version: u64, wall_clock_us: u64) -> u64 {
    last_version.saturating_add(1).max(wall_clock_us)
}

fn wall_clock_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Row, Deserialize)]
struct VersionRow {
    version: String,
}

#[derive(Row, Deserialize)]
struct SchemaVersionRow {
    version: u32,
}

#[derive(Row, Deserialize)]
struct CheckpointVersionRow {
    version: u64,
}

#[derive(Row, Deserialize)]
struct PartitionRow {
    partition: String,
}

/// FNV-1a, for deterministic dedup tokens (the same block hashes the same in every process).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl ClickHouseReader {
    fn new(client: Client, config: &ClickHouseStoreConfig) -> Self {
        Self {
            client: Arc::new(client),
            url: Arc::from(config.url.as_str()),
            database: Arc::from(config.schema.database.as_str()),
            resolutions_ms: config
                .schema
                .rollups
                .iter()
                .map(|rollup| rollup.resolution_ms)
                .collect(),
            finest_resolution_ms: config.schema.finest_resolution_ms(),
            request_timeout_ms: config.request_timeout_ms,
        }
    }

    /// The rollup resolutions the schema has tables for.
    pub fn resolutions_ms(&self) -> &[i64] {
        &self.resolutions_ms
    }

    fn database(&self) -> &str {
        &self.database
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    fn error(&self, operation: &str, source: ::clickhouse::error::Error) -> StoreError {
        StoreError::ClickHouse {
            url: self.url.to_string(),
            operation: operation.to_string(),
            source,
        }
    }

    fn timed_out(&self, operation: &str) -> StoreError {
        StoreError::Timeout {
            url: self.url.to_string(),
            operation: operation.to_string(),
            timeout_ms: self.request_timeout_ms,
        }
    }

    async fn execute(&self, sql: &str, operation: &str) -> Result<(), StoreError> {
        match tokio::time::timeout(self.timeout(), self.client.query(sql).execute()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(self.error(operation, source)),
            Err(_) => Err(self.timed_out(operation)),
        }
    }

    async fn fetch_all<T: RowOwned + RowRead>(
        &self,
        sql: &str,
        operation: &str,
    ) -> Result<Vec<T>, StoreError> {
        match tokio::time::timeout(self.timeout(), self.client.query(sql).fetch_all::<T>()).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(source)) => Err(self.error(operation, source)),
            Err(_) => Err(self.timed_out(operation)),
        }
    }

    async fn fetch_one<T: RowOwned + RowRead>(
        &self,
        sql: &str,
        operation: &str,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout(), self.client.query(sql).fetch_one::<T>()).await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(source)) => Err(self.error(operation, source)),
            Err(_) => Err(self.timed_out(operation)),
        }
    }

    /// Devices and the agent that reported each last.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.fetch_all(&schema::sql_list_devices(self.database()), "list devices")
            .await
    }

    /// Every series with when it was last seen.
    pub async fn list_series(&self) -> Result<Vec<SeriesRow>, StoreError> {
        self.fetch_all(&schema::sql_list_series(self.database()), "list series")
            .await
    }

    /// Latest value per series (all series when `series` is empty), from the finest rollup.
    pub async fn latest_values(
        &self,
        series: &[SeriesSelector],
    ) -> Result<Vec<LatestValueRow>, StoreError> {
        let Some(finest) = self.finest_resolution_ms else {
            return Ok(Vec::new());
        };
        self.fetch_all(
            &schema::sql_latest_values(self.database(), finest, series),
            "read latest values",
        )
        .await
    }

    /// Windows of `series` at `resolution_ms` starting in `[from_ms, to_ms)`, one row per
    /// agent and window at its highest version. An empty selection selects nothing.
    pub async fn rollup_range(
        &self,
        resolution_ms: i64,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RollupRow>, StoreError> {
        if !self.resolutions_ms.contains(&resolution_ms) {
            return Err(StoreError::UnknownResolution { resolution_ms });
        }
        match schema::sql_rollup_range(self.database(), resolution_ms, series, from_ms, to_ms) {
            Some(sql) => self.fetch_all(&sql, "read a rollup range").await,
            None => Ok(Vec::new()),
        }
    }

    /// Raw readings of `series` in `[from_ms, to_ms)`, each once. An empty selection selects
    /// nothing.
    pub async fn raw_range(
        &self,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RawReadingRow>, StoreError> {
        match schema::sql_raw_range(self.database(), series, from_ms, to_ms) {
            Some(sql) => self.fetch_all(&sql, "read a raw range").await,
            None => Ok(Vec::new()),
        }
    }

    /// Late rows and readings with event time in `[from_ms, to_ms)` per agent, reason, resolution.
    pub async fn late_counts(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LateCountRow>, StoreError> {
        self.fetch_all(
            &schema::sql_late_counts(self.database(), from_ms, to_ms),
            "count late readings",
        )
        .await
    }

    /// The latest durable checkpoint of `(group, partition)`.
    pub async fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let rows: Vec<CheckpointRow> = self
            .fetch_all(
                &schema::sql_load_checkpoint(self.database(), group, partition),
                &format!("load the checkpoint of group {group:?} partition {partition}"),
            )
            .await?;
        Ok(rows.into_iter().next().map(CheckpointRow::into_checkpoint))
    }
}

impl ClickHouseStore {
    /// Connects, detects the server version, and creates (or checks) the schema.
    pub async fn connect(config: ClickHouseStoreConfig, now_ms: i64) -> Result<Self, StoreError> {
        config.schema.validate()?;
        let mut client = Client::default()
            .with_url(&config.url)
            .with_validation(false);
        if let Some(user) = &config.user {
            client = client.with_user(user);
        }
        if let Some(password) = &config.password {
            client = client.with_password(password);
        }
        let mut store = Self {
            insert_client: client.clone().with_database(&config.schema.database),
            reader: ClickHouseReader::new(client, &config),
            resolutions_ms: config
                .schema
                .rollups
                .iter()
                .map(|rollup| rollup.resolution_ms)
                .collect(),
            config,
            dialect: Dialect::Legacy,
            server_version: String::new(),
            pending: PendingWrites::default(),
            last_checkpoint_version: 0,
        };
        let version: VersionRow = store
            .reader
            .fetch_one("SELECT version() AS version", "detect the server version")
            .await?;
        store.dialect = Dialect::for_version(&version.version)?;
        store.server_version = version.version;
        store.migrate(now_ms).await?;
        let checkpoint_version: CheckpointVersionRow = store
            .reader
            .fetch_one(
                &schema::sql_max_checkpoint_version(store.database()),
                "read the highest checkpoint version",
            )
            .await?;
        store.last_checkpoint_version = checkpoint_version.version;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    pub fn config(&self) -> &ClickHouseStoreConfig {
        &self.config
    }

    /// The read side, for the query API; clones share the HTTP client.
    pub fn reader(&self) -> ClickHouseReader {
        self.reader.clone()
    }

    fn database(&self) -> &str {
        &self.config.schema.database
    }

    fn timeout(&self) -> Duration {
        self.reader.timeout()
    }

    /// Creates what is missing and records the schema version; refuses a newer schema.
    async fn migrate(&self, now_ms: i64) -> Result<(), StoreError> {
        for statement in schema::render_schema(&self.config.schema, self.dialect)? {
            self.reader.execute(&statement, "create the schema").await?;
        }
        let database = self.database();
        let found: SchemaVersionRow = self
            .reader
            .fetch_one(
                &schema::sql_schema_version(database),
                "read the schema version",
            )
            .await?;
        if found.version > schema::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                database: database.to_string(),
                found: found.version,
                supported: schema::SCHEMA_VERSION,
            });
        }
        if found.version < schema::SCHEMA_VERSION {
            self.reader
                .execute(
                    &schema::sql_record_schema_version(database, now_ms),
                    "record the schema version",
                )
                .await?;
        }
        Ok(())
    }

    /// One insert of `rows` into `table`, bounded by the request timeout.
    async fn insert_once<T>(&self, table: &str, rows: &[T], token: &str) -> Result<(), StoreError>
    where
        T: RowOwned + RowWrite + Serialize + Sync,
    {
        let operation = format!("insert {} rows into {table}", rows.len());
        let attempt = async {
            let mut insert = self.insert_client.insert::<T>(table).await?;
            if self.dialect == Dialect::Modern {
                insert = insert.with_setting("insert_deduplication_token", token);
            }
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        match tokio::time::timeout(self.timeout(), attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(self.reader.error(&operation, source)),
            Err(_) => Err(self.reader.timed_out(&operation)),
        }
    }

    /// Inserts `rows` as one block, retrying the same block with backoff.
    async fn insert_with_retry<T>(
        &self,
        table: &str,
        rows: &[T],
        report: &mut FlushReport,
    ) -> Result<(), StoreError>
    where
        T: RowOwned + RowWrite + Serialize + Sync,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let encoded = postcard::to_allocvec(rows).unwrap_or_default();
        let token = format!("{table}-{}-{:016x}", rows.len(), fnv1a(&encoded));
        let started = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            match self.insert_once(table, rows, &token).await {
                Ok(()) => {
                    report.rows_written += rows.len();
                    return Ok(());
                }
                Err(error) if !error.is_transient() => return Err(error),
                Err(error) => {
                    let delay_ms = self.config.retry.delay_ms(attempt);
                    let elapsed_ms =
                        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    if !self.config.retry.should_retry(elapsed_ms, delay_ms) {
                        return Err(StoreError::RetriesExhausted {
                            url: self.config.url.clone(),
                            table: table.to_string(),
                            attempts: attempt + 1,
                            elapsed_ms,
                            last_error: error.to_string(),
                        });
                    }
                    tracing::warn!(%error, attempt, delay_ms, table, "ClickHouse insert failed; retrying the same block");
                    report.retries += 1;
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
            }
        }
    }

    /// [`Self::insert_with_retry`] with a report of its own (for concurrent inserts).
    async fn insert_block<T>(&self, table: &str, rows: &[T]) -> Result<FlushReport, StoreError>
    where
        T: RowOwned + RowWrite + Serialize + Sync,
    {
        let mut report = FlushReport::default();
        self.insert_with_retry(table, rows, &mut report).await?;
        Ok(report)
    }

    async fn flush_pending(&mut self) -> Result<FlushReport, StoreError> {
        // The row tables are inserted concurrently: a flush then takes about as long as its
        // slowest insert instead of the sum of five, so a caught-up processor's next flush
        // (the dashboard's fresh rows) is not held up behind the last one. Each table's
        // buffer is cleared only once its block is durable; a failed one stays buffered and
        // the whole flush is retried (the blocks that landed replace on their keys).
        let raw = std::mem::take(&mut self.pending.raw);
        let rollups = std::mem::take(&mut self.pending.rollups);
        let late = std::mem::take(&mut self.pending.late);
        let last_seen = self.pending.last_seen_rows();
        let (raw_result, rollup_results, late_result, last_seen_result) = {
            let store = &*self;
            let rollup_inserts = async {
                // Few resolutions (two by default): one after another in this branch.
                let mut results = Vec::with_capacity(rollups.len());
                for (resolution_ms, rows) in &rollups {
                    let table = schema::rollup_table_name(*resolution_ms);
                    results.push((*resolution_ms, store.insert_block(&table, rows).await));
                }
                results
            };
            tokio::join!(
                store.insert_block(RAW_TABLE, &raw),
                rollup_inserts,
                store.insert_block(LATE_TABLE, &late),
                store.insert_block(LAST_SEEN_TABLE, &last_seen),
            )
        };
        let mut report = FlushReport::default();
        let mut failure = None;
        let mut account = |result: Result<FlushReport, StoreError>| match result {
            Ok(done) => {
                report.rows_written += done.rows_written;
                report.retries += done.retries;
                true
            }
            Err(error) => {
                failure.get_or_insert(error);
                false
            }
        };
        if !account(raw_result) {
            self.pending.raw = raw;
        }
        let mut rollups = rollups;
        for (resolution_ms, result) in rollup_results {
            if account(result) {
                rollups.remove(&resolution_ms);
            }
        }
        self.pending.rollups = rollups;
        if !account(late_result) {
            self.pending.late = late;
        }
        if account(last_seen_result) {
            self.pending.last_seen.clear();
        }
        if let Some(error) = failure {
            return Err(error);
        }
        // Last: a checkpoint is never durable before the rows it accounts for.
        if !self.pending.checkpoints.is_empty() {
            let mut version = self.last_checkpoint_version;
            let rows: Vec<CheckpointRow> = self
                .pending
                .checkpoints
                .values()
                .map(|checkpoint| {
                    version = next_checkpoint_version(version, wall_clock_us());
                    CheckpointRow {
                        consumer_group: checkpoint.group.clone(),
                        log_partition: checkpoint.partition,
                        next_offset: checkpoint.next_offset,
                        engine_state: checkpoint.engine_state.clone(),
                        saved_version: version,
                    }
                })
                .collect();
            self.insert_with_retry(CHECKPOINTS_TABLE, &rows, &mut report)
                .await?;
            self.last_checkpoint_version = version;
            self.pending.checkpoints.clear();
        }
        self.pending.mark_flushed();
        Ok(report)
    }

    /// Devices and the agent that reported each last.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.reader.list_devices().await
    }

    /// Every series with when it was last seen.
    pub async fn list_series(&self) -> Result<Vec<SeriesRow>, StoreError> {
        self.reader.list_series().await
    }

    /// See [`ClickHouseReader::latest_values`].
    pub async fn latest_values(
        &self,
        series: &[SeriesSelector],
    ) -> Result<Vec<LatestValueRow>, StoreError> {
        self.reader.latest_values(series).await
    }

    /// See [`ClickHouseReader::rollup_range`].
    pub async fn rollup_range(
        &self,
        resolution_ms: i64,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RollupRow>, StoreError> {
        self.reader
            .rollup_range(resolution_ms, series, from_ms, to_ms)
            .await
    }

    /// See [`ClickHouseReader::raw_range`].
    pub async fn raw_range(
        &self,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RawReadingRow>, StoreError> {
        self.reader.raw_range(series, from_ms, to_ms).await
    }

    /// See [`ClickHouseReader::late_counts`].
    pub async fn late_counts(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LateCountRow>, StoreError> {
        self.reader.late_counts(from_ms, to_ms).await
    }

    /// Drops daily partitions older than each table's retention; returns `(table, day)` pairs
    /// dropped. Needed on servers without `TTL`; harmless (usually a no-op) on the others.
    pub async fn drop_expired_partitions(
        &self,
        now_ms: i64,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let mut dropped = Vec::new();
        for retained in self.config.schema.retained_tables() {
            let partitions: Vec<PartitionRow> = self
                .reader
                .fetch_all(
                    &schema::sql_list_partitions(self.database(), &retained.table),
                    &format!("list partitions of {}", retained.table),
                )
                .await?;
            let ids: Vec<String> = partitions.into_iter().map(|row| row.partition).collect();
            for day in schema::partitions_to_drop(&ids, now_ms, retained.retention_days) {
                self.reader
                    .execute(
                        &schema::sql_drop_partition(self.database(), &retained.table, day),
                        &format!("drop partition {day} of {}", retained.table),
                    )
                    .await?;
                tracing::info!(table = %retained.table, day, "dropped an expired partition");
                dropped.push((retained.table.clone(), day));
            }
        }
        Ok(dropped)
    }
}

impl Store for ClickHouseStore {
    fn write_raw_readings(&mut self, rows: Vec<RawReadingRow>, now_ms: i64) {
        self.pending.push_raw(rows, now_ms);
    }

    fn write_window_results(
        &mut self,
        results: &[WindowResult],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.pending
            .push_results(results, &self.resolutions_ms, now_ms)
    }

    fn write_late_readings(&mut self, late: &[LateReading], now_ms: i64) {
        self.pending.push_late(late, now_ms);
    }

    fn write_last_seen(&mut self, rows: Vec<LastSeenRow>, now_ms: i64) {
        self.pending.push_last_seen(rows, now_ms);
    }

    fn write_checkpoint(&mut self, checkpoint: Checkpoint) {
        self.pending.push_checkpoint(checkpoint);
    }

    fn load_checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> impl std::future::Future<Output = Result<Option<Checkpoint>, StoreError>> + Send {
        let reader = self.reader.clone();
        let group = group.to_string();
        async move { reader.load_checkpoint(&group, partition).await }
    }

    fn buffered_rows(&self) -> usize {
        self.pending.row_count()
    }

    fn flush_due(&self, now_ms: i64) -> bool {
        self.pending.flush_due(&self.config.batch, now_ms)
    }

    fn flush(
        &mut self,
    ) -> impl std::future::Future<Output = Result<FlushReport, StoreError>> + Send {
        self.flush_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::next_checkpoint_version;

    #[test]
    fn checkpoint_versions_only_grow() {
        assert_eq!(next_checkpoint_version(0, 1_000), 1_000);
        assert_eq!(next_checkpoint_version(1_000, 1_000), 1_001);
        assert_eq!(
            next_checkpoint_version(5_000, 1_000),
            5_001,
            "a clock step back"
        );
        assert_eq!(next_checkpoint_version(u64::MAX, 0), u64::MAX);
    }
}
