//! The HTTP/JSON handlers under `/api/v1/` and the shapes they answer with.
//!
//! Why thin: each handler parses its parameters with [`super::params`] (plain code, unit
//! tested), asks the store or the fleet view, and maps rows to response types. The response
//! types are the API's contract, described in `assets/openapi.json`; the rows stay the
//! store's business.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::params::{
    selector_string, ParamError, QueryParams, RangeRequest, RawRequest, TimeRange, MAX_LATE_SPAN_MS,
};
use super::{json_response, ApiError, ApiState};
use crate::ingest::AgentStatus;
use crate::store::{DeviceRow, LateCountRow, LatestValueRow, RawReadingRow, RollupRow, SeriesRow};

pub(crate) type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

pub(crate) fn query_params(params: Params) -> Result<QueryParams, ApiError> {
    match params {
        Ok(Query(pairs)) => Ok(QueryParams::new(pairs)),
        Err(rejection) => Err(ApiError::BadRequest(ParamError::new(
            "query",
            format!("the query string cannot be decoded: {rejection}"),
        ))),
    }
}

#[derive(Debug, Serialize)]
pub struct InfoResponse {
    pub api_version: &'static str,
    pub collector_version: &'static str,
    pub now_ms: i64,
    /// Rollup resolutions the store keeps, finest first.
    pub resolutions_ms: Vec<i64>,
    pub live_listeners: usize,
}

pub(crate) async fn info(State(state): State<ApiState>) -> Response {
    let body = InfoResponse {
        api_version: "v1",
        collector_version: env!("CARGO_PKG_VERSION"),
        now_ms: state.now_ms(),
        resolutions_ms: state.resolutions_ms(),
        live_listeners: state.shared.live.listeners(),
    };
    json_response(StatusCode::OK, &body)
}

#[derive(Debug, Serialize)]
pub struct AgentBacklog {
    pub batches: u64,
    pub bytes: u64,
    pub oldest_unsent_time_ms: Option<i64>,
    /// `now_ms - oldest_unsent_time_ms`: how far behind the agent's backlog reaches.
    pub oldest_unsent_age_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct AgentResponse {
    pub agent_id: String,
    pub online: bool,
    pub agent_version: String,
    pub remote_address: String,
    pub last_seen_ms: i64,
    pub last_seen_age_ms: i64,
    pub connected_since_ms: i64,
    /// As the agent reported it in its last hello.
    pub reported_backlog: AgentBacklog,
    pub batches_acked: u64,
    pub readings_acked: u64,
    pub duplicates: u64,
    pub highest_acked_seq: Option<u64>,
}

impl AgentResponse {
    pub fn from_status(status: AgentStatus, now_ms: i64) -> Self {
        let backlog = status.reported_backlog;
        Self {
            online: status.connected,
            remote_address: status.remote_address.to_string(),
            last_seen_age_ms: now_ms.saturating_sub(status.last_seen_ms).max(0),
            last_seen_ms: status.last_seen_ms,
            connected_since_ms: status.connected_since_ms,
            reported_backlog: AgentBacklog {
                batches: backlog.batches,
                bytes: backlog.bytes,
                oldest_unsent_time_ms: backlog.oldest_unsent_time_ms,
                oldest_unsent_age_ms: backlog
                    .oldest_unsent_time_ms
                    .map(|oldest| now_ms.saturating_sub(oldest).max(0)),
            },
            batches_acked: status.batches_acked,
            readings_acked: status.readings_acked,
            duplicates: status.duplicates,
            highest_acked_seq: status.highest_acked_seq,
            agent_version: status.agent_version,
            agent_id: status.agent_id,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AgentsResponse {
    pub now_ms: i64,
    pub online: usize,
    pub offline: usize,
    pub agents: Vec<AgentResponse>,
}

pub(crate) async fn agents(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        query_params(params)?.only(&[])?;
        let now_ms = state.now_ms();
        let agents: Vec<AgentResponse> = state
            .shared
            .fleet
            .snapshot()
            .into_iter()
            .map(|status| AgentResponse::from_status(status, now_ms))
            .collect();
        let online = agents.iter().filter(|agent| agent.online).count();
        Ok(AgentsResponse {
            now_ms,
            online,
            offline: agents.len() - online,
            agents,
        })
    })
    .await
}

#[derive(Debug, Serialize)]
pub struct DeviceResponse {
    pub device_id: String,
    pub last_agent_id: String,
    /// When the collector last received data of the device (log time).
    pub last_seen_ms: u64,
}

impl From<DeviceRow> for DeviceResponse {
    fn from(row: DeviceRow) -> Self {
        Self {
            device_id: row.device_id,
            last_agent_id: row.last_agent_id,
            last_seen_ms: row.last_seen_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DevicesResponse {
    pub devices: Vec<DeviceResponse>,
}

pub(crate) async fn devices(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        query_params(params)?.only(&[])?;
        let rows = state.shared.queries.list_devices().await?;
        Ok(DevicesResponse {
            devices: rows.into_iter().map(DeviceResponse::from).collect(),
        })
    })
    .await
}

/// Which series an answer is about, with the ready-made selector that names it in a query.
/// Flattened into every per-series response, so the JSON fields stand beside the others
/// (`device_id`, `metric`, `tags`, `selector`) and the selector is built in one place.
#[derive(Debug, Serialize)]
pub struct SeriesIdentity {
    pub device_id: String,
    pub metric: String,
    pub tags: String,
    /// The `series` parameter value that names this series.
    pub selector: String,
}

impl SeriesIdentity {
    pub fn new(device_id: String, metric: String, tags: String) -> Self {
        Self {
            selector: selector_string(&device_id, &metric, &tags),
            device_id,
            metric,
            tags,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SeriesResponse {
    #[serde(flatten)]
    pub series: SeriesIdentity,
    pub last_seen_ms: u64,
}

impl From<SeriesRow> for SeriesResponse {
    fn from(row: SeriesRow) -> Self {
        Self {
            series: SeriesIdentity::new(row.device_id, row.metric, row.tags),
            last_seen_ms: row.last_seen_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SeriesListResponse {
    pub series: Vec<SeriesResponse>,
}

pub(crate) async fn all_series(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        query_params(params)?.only(&[])?;
        let rows = state.shared.queries.list_series().await?;
        Ok(SeriesListResponse {
            series: rows.into_iter().map(SeriesResponse::from).collect(),
        })
    })
    .await
}

pub(crate) async fn device_series(
    State(state): State<ApiState>,
    Path(device_id): Path<String>,
    params: Params,
) -> Response {
    respond(async {
        query_params(params)?.only(&[])?;
        let rows = state.shared.queries.list_series().await?;
        let series: Vec<SeriesResponse> = rows
            .into_iter()
            .filter(|row| row.device_id == device_id)
            .map(SeriesResponse::from)
            .collect();
        if series.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no device {device_id:?} has reported data; list devices with /api/v1/devices"
            )));
        }
        Ok(SeriesListResponse { series })
    })
    .await
}

#[derive(Debug, Serialize)]
pub struct LatestValueResponse {
    #[serde(flatten)]
    pub series: SeriesIdentity,
    pub time_ms: i64,
    pub value: f64,
}

impl From<LatestValueRow> for LatestValueResponse {
    fn from(row: LatestValueRow) -> Self {
        Self {
            series: SeriesIdentity::new(row.device_id, row.metric, row.tags),
            time_ms: row.time_ms,
            value: row.value,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LatestResponse {
    pub values: Vec<LatestValueResponse>,
}

pub(crate) async fn latest(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        let params = query_params(params)?;
        params.only(&["series"])?;
        let series = params.series()?;
        let rows = state.shared.queries.latest_values(&series).await?;
        Ok(LatestResponse {
            values: rows.into_iter().map(LatestValueResponse::from).collect(),
        })
    })
    .await
}

#[derive(Debug, Serialize)]
pub struct WindowResponse {
    pub agent_id: String,
    #[serde(flatten)]
    pub series: SeriesIdentity,
    pub window_start_ms: i64,
    /// False while the window may still change (a running emission).
    pub is_final: bool,
    pub count: u64,
    pub sum: f64,
    pub mean: Option<f64>,
    pub min: f64,
    pub max: f64,
    pub first_time_ms: i64,
    pub first_value: f64,
    pub last_time_ms: i64,
    pub last_value: f64,
    /// `null` when the window's sketch has no estimate.
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

impl From<RollupRow> for WindowResponse {
    fn from(row: RollupRow) -> Self {
        Self {
            mean: (row.count > 0).then(|| row.sum / row.count as f64),
            agent_id: row.agent_id,
            series: SeriesIdentity::new(row.device_id, row.metric, row.tags),
            window_start_ms: row.window_start_ms,
            is_final: row.is_final != 0,
            count: row.count,
            sum: row.sum,
            min: row.min,
            max: row.max,
            first_time_ms: row.first_time_ms,
            first_value: row.first_value,
            last_time_ms: row.last_time_ms,
            last_value: row.last_value,
            p50: finite(row.p50),
            p90: finite(row.p90),
            p99: finite(row.p99),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RangeResponse {
    pub resolution_ms: i64,
    #[serde(flatten)]
    pub range: TimeRange,
    pub windows: Vec<WindowResponse>,
}

pub(crate) async fn range(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        let request = RangeRequest::parse(&query_params(params)?, &state.resolutions_ms())?;
        let rows = state
            .shared
            .queries
            .rollup_range(
                request.resolution_ms,
                &request.series,
                request.range.from_ms,
                request.range.to_ms,
            )
            .await?;
        Ok(RangeResponse {
            resolution_ms: request.resolution_ms,
            range: request.range,
            windows: rows.into_iter().map(WindowResponse::from).collect(),
        })
    })
    .await
}

#[derive(Debug, Serialize)]
pub struct RawReadingResponse {
    pub agent_id: String,
    pub batch_seq: u64,
    #[serde(flatten)]
    pub series: SeriesIdentity,
    pub time_ms: i64,
    pub value: f64,
    pub flags: u8,
}

impl From<RawReadingRow> for RawReadingResponse {
    fn from(row: RawReadingRow) -> Self {
        Self {
            agent_id: row.agent_id,
            batch_seq: row.batch_seq,
            series: SeriesIdentity::new(row.device_id, row.metric, row.tags),
            time_ms: row.time_ms,
            value: row.value,
            flags: row.flags,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RawResponse {
    #[serde(flatten)]
    pub range: TimeRange,
    pub readings: Vec<RawReadingResponse>,
}

pub(crate) async fn raw(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        let request = RawRequest::parse(&query_params(params)?)?;
        let rows = state
            .shared
            .queries
            .raw_range(&request.series, request.range.from_ms, request.range.to_ms)
            .await?;
        Ok(RawResponse {
            range: request.range,
            readings: rows.into_iter().map(RawReadingResponse::from).collect(),
        })
    })
    .await
}

#[derive(Debug, Serialize)]
pub struct LateCountResponse {
    pub agent_id: String,
    /// `window_closed`, `too_far_ahead`, `invalid` or `event_time_out_of_range`.
    pub reason: String,
    /// 0 when refused before windowing.
    pub resolution_ms: i64,
    pub late_rows: u64,
    pub late_readings: u64,
}

impl From<LateCountRow> for LateCountResponse {
    fn from(row: LateCountRow) -> Self {
        Self {
            agent_id: row.agent_id,
            reason: row.reason,
            resolution_ms: row.resolution_ms,
            late_rows: row.late_rows,
            late_readings: row.late_readings,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LateResponse {
    #[serde(flatten)]
    pub range: TimeRange,
    pub counts: Vec<LateCountResponse>,
}

pub(crate) async fn late(State(state): State<ApiState>, params: Params) -> Response {
    respond(async {
        let params = query_params(params)?;
        params.only(&["from_ms", "to_ms"])?;
        let range = TimeRange::from_params(&params, MAX_LATE_SPAN_MS)?;
        let rows = state
            .shared
            .queries
            .late_counts(range.from_ms, range.to_ms)
            .await?;
        Ok(LateResponse {
            range,
            counts: rows.into_iter().map(LateCountResponse::from).collect(),
        })
    })
    .await
}

async fn respond<T: Serialize>(
    answer: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Response {
    match answer.await {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => error.into_response(),
    }
}
