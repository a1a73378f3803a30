//! One read interface over both stores, for the query API.
//!
//! Why an enum and not a trait object: there are exactly two stores, the query API wants a
//! cheap `Clone` it can hand to every request, and async methods stay plain `async fn`.
//! Both arms answer every query with the same rows in the same order (a test writes the
//! same sequence into both and compares every answer).

use super::schema::SeriesSelector;
use super::{
    ClickHouseReader, DeviceRow, EmbeddedReader, LateCountRow, LatestValueRow, RawReadingRow,
    RollupRow, SeriesRow, StoreError,
};

/// Read side used by the query API; same answers from either store.
#[derive(Clone)]
pub enum Queries {
    Embedded(EmbeddedReader),
    ClickHouse(ClickHouseReader),
}

impl Queries {
    /// The rollup resolutions that [`Queries::rollup_range`] accepts.
    pub fn resolutions_ms(&self) -> &[i64] {
        match self {
            Queries::Embedded(reader) => reader.resolutions_ms(),
            Queries::ClickHouse(reader) => reader.resolutions_ms(),
        }
    }

    /// Devices, ordered by id, with the agent that reported each last.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => reader.list_devices().await,
            Queries::ClickHouse(reader) => reader.list_devices().await,
        }
    }

    /// Series, ordered by (device, metric, tags), with when each was last seen.
    pub async fn list_series(&self) -> Result<Vec<SeriesRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => reader.list_series().await,
            Queries::ClickHouse(reader) => reader.list_series().await,
        }
    }

    /// Latest value per series from the finest rollup; an empty `series` means all series.
    pub async fn latest_values(
        &self,
        series: &[SeriesSelector],
    ) -> Result<Vec<LatestValueRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => reader.latest_values(series).await,
            Queries::ClickHouse(reader) => reader.latest_values(series).await,
        }
    }

    /// Windows starting in `[from_ms, to_ms)`, ordered by series, window start, agent; an
    /// empty `series` selects nothing; an unconfigured resolution is an error.
    pub async fn rollup_range(
        &self,
        resolution_ms: i64,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RollupRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => {
                reader
                    .rollup_range(resolution_ms, series, from_ms, to_ms)
                    .await
            }
            Queries::ClickHouse(reader) => {
                reader
                    .rollup_range(resolution_ms, series, from_ms, to_ms)
                    .await
            }
        }
    }

    /// Raw readings in `[from_ms, to_ms)`, ordered by series, time, agent, batch, position;
    /// an empty `series` selects nothing.
    pub async fn raw_range(
        &self,
        series: &[SeriesSelector],
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<RawReadingRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => reader.raw_range(series, from_ms, to_ms).await,
            Queries::ClickHouse(reader) => reader.raw_range(series, from_ms, to_ms).await,
        }
    }

    /// Late rows and readings with event time in `[from_ms, to_ms)`, per agent, reason and
    /// resolution.
    pub async fn late_counts(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LateCountRow>, StoreError> {
        match self {
            Queries::Embedded(reader) => reader.late_counts(from_ms, to_ms).await,
            Queries::ClickHouse(reader) => reader.late_counts(from_ms, to_ms).await,
        }
    }
}

impl From<EmbeddedReader> for Queries {
    fn from(reader: EmbeddedReader) -> Self {
        Queries::Embedded(reader)
    }
}

impl From<ClickHouseReader> for Queries {
    fn from(reader: ClickHouseReader) -> Self {
        Queries::ClickHouse(reader)
    }
}
