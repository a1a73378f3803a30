//! The query API, the live WebSocket and the dashboard page, served over one HTTP port.
//!
//! Why one router: operators open one address and get the page (`/`), the JSON they can
//! script against (`/api/v1/...`, described by `/api/v1/openapi.json`) and the live push
//! (`/api/v1/live`), all answering from the same store readers, fleet view and live feed.
//! The store is asked only on request; live data comes from the [`LiveFeed`], never from
//! polling the database.
//!
//! Access: with a token configured every `/api/v1/` route (but the OpenAPI document) needs
//! `Authorization: Bearer <token>` (browsers' WebSockets cannot set headers, so
//! `/api/v1/live` also takes `?access_token=`). Without a token [`serve`] refuses any
//! listener that is not loopback-only: data never leaves the machine unauthenticated. The
//! page and its assets carry no data and are always served.
//!
//! - [`params`]: query parameters and series selectors, checked without IO.
//! - [`routes`]: the JSON handlers and response shapes.
//! - [`live`]: the WebSocket protocol and the per-client filter.
//! - `assets/`: the page, its script and style, and the OpenAPI document, embedded in the
//!   binary (no Node at build or run time).
//!
//! Contract and examples: `docs/api.md`; the page: `docs/dashboard.md`.

pub mod live;
pub mod params;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::live::LiveLimits;
use self::params::ParamError;
use crate::ingest::FleetView;
use crate::live::LiveFeed;
use crate::store::{Queries, StoreError};

/// Milliseconds since the Unix epoch; injected so tests control "now".
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

/// Every route the router serves, as `(method, path)`; the OpenAPI document must describe
/// exactly these (tested).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/info"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/{device_id}/series"),
    ("GET", "/api/v1/series"),
    ("GET", "/api/v1/latest"),
    ("GET", "/api/v1/range"),
    ("GET", "/api/v1/raw"),
    ("GET", "/api/v1/late"),
    ("GET", "/api/v1/live"),
    ("GET", "/api/v1/openapi.json"),
];

/// The hand-written OpenAPI 3 description of [`ROUTES`].
pub const OPENAPI_JSON: &str = include_str!("assets/openapi.json");
const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// What the API reads. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    shared: Arc<Shared>,
    live_limits: LiveLimits,
}

struct Shared {
    queries: Queries,
    fleet: FleetView,
    live: LiveFeed,
    token: Option<String>,
    clock: Clock,
    shutdown: watch::Receiver<bool>,
    shutdown_sender: watch::Sender<bool>,
}

impl ApiState {
    /// `token`: the bearer token clients must send; `None` allows only loopback listeners.
    pub fn new(queries: Queries, fleet: FleetView, live: LiveFeed, token: Option<String>) -> Self {
        Self::with_clock(queries, fleet, live, token, system_clock())
    }

    /// As [`ApiState::new`] with an injected clock (tests).
    pub fn with_clock(
        queries: Queries,
        fleet: FleetView,
        live: LiveFeed,
        token: Option<String>,
        clock: Clock,
    ) -> Self {
        let (shutdown_sender, shutdown) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                queries,
                fleet,
                live,
                token,
                clock,
                shutdown,
                shutdown_sender,
            }),
            live_limits: LiveLimits::default(),
        }
    }

    /// Sets the WebSocket limits.
    pub fn with_live_limits(mut self, live_limits: LiveLimits) -> Self {
        self.live_limits = live_limits;
        self
    }

    fn now_ms(&self) -> i64 {
        (self.shared.clock)()
    }

    fn resolutions_ms(&self) -> Vec<i64> {
        let mut resolutions: Vec<i64> = self.shared.queries.resolutions_ms().to_vec();
        resolutions.sort_unstable();
        resolutions
    }
}

/// Why a request failed; rendered as `{"error": "..."}` with a 4xx or 5xx status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(#[from] ParamError),
    #[error("{0}")]
    NotFound(String),
    #[error("the store could not answer: {0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Store(StoreError::UnknownResolution { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "query API request failed");
        }
        error_response(status, self.to_string())
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error_response(status: StatusCode, error: String) -> Response {
    json_response(status, &ErrorBody { error })
}

pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer as JSON: {error}"),
        )
            .into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// Compares without an early exit, so response times do not reveal how much of a guess matched.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0_u8, |difference, (left, right)| {
                difference | (left ^ right)
            })
            == 0
}

fn query_token(request: &Request) -> Option<String> {
    let axum::extract::Query(pairs) =
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri()).ok()?;
    pairs
        .into_iter()
        .find(|(name, _)| name == "access_token")
        .map(|(_, value)| value)
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.shared.token.as_deref() else {
        return next.run(request).await;
    };
    if request.uri().path() == "/api/v1/openapi.json" {
        return next.run(request).await;
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned);
    let given = match bearer {
        Some(token) => Some(token),
        None if request.uri().path() == "/api/v1/live" => query_token(&request),
        None => None,
    };
    match given {
        Some(token) if same_token(token.trim().as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => error_response(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not the API token of this collector".to_string(),
        ),
        None => {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "this API needs a token: send `Authorization: Bearer <token>` (the token is `api.token` in the collector's config)"
                    .to_string(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tributary\""),
            );
            response
        }
    }
}

async fn live_socket(
    State(state): State<ApiState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return error_response(
                rejection.status(),
                format!(
                    "/api/v1/live is a WebSocket: connect with a WebSocket client ({rejection})"
                ),
            )
        }
    };
    let shared = &state.shared;
    let feed = shared.live.clone();
    let clock = shared.clock.clone();
    let limits = state.live_limits;
    let shutdown = shared.shutdown.clone();
    upgrade
        .max_message_size(live::MAX_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |socket| live::run_connection(socket, feed, clock, limits, shutdown))
}

async fn fallback(method: Method, uri: axum::http::Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {}; the API is described at /api/v1/openapi.json",
            uri.path()
        ),
    )
}

/// The whole router: page, assets, API and WebSocket.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/info", get(routes::info))
        .route("/api/v1/agents", get(routes::agents))
        .route("/api/v1/devices", get(routes::devices))
        .route(
            "/api/v1/devices/{device_id}/series",
            get(routes::device_series),
        )
        .route("/api/v1/series", get(routes::all_series))
        .route("/api/v1/latest", get(routes::latest))
        .route("/api/v1/range", get(routes::range))
        .route("/api/v1/raw", get(routes::raw))
        .route("/api/v1/late", get(routes::late))
        .route("/api/v1/live", get(live_socket))
        .route(
            "/api/v1/openapi.json",
            get(|| async { asset("application/json", OPENAPI_JSON) }),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) }),
        )
        .route(
            "/assets/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) }),
        )
        .merge(api)
        .fallback(fallback)
        .with_state(state)
}

fn loopback_only(address: SocketAddr) -> bool {
    address.ip().is_loopback()
}

/// Serves the page, the API and the WebSocket on `listener` until `shutdown` resolves; then
/// closes the live connections too.
///
/// Refuses to start without a token unless the listener is loopback-only, and refuses an
/// empty token.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    match state.shared.token.as_deref() {
        Some(token) if token.trim().is_empty() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the API token is empty; set api.token to a long random string or leave it out on a loopback address",
            ));
        }
        None if !loopback_only(address) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the query API would listen on {address} without a token; set api.token in the \
                     collector's config, or listen on a loopback address (127.0.0.1)"
                ),
            ));
        }
        _ => {}
    }
    let stopper = state.shared.shutdown_sender.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stopper.send(true);
    };
    tracing::info!(%address, token_required = state.shared.token.is_some(), "query API and dashboard listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token(b"secret", b"secret"));
        assert!(!same_token(b"secreT", b"secret"));
        assert!(!same_token(b"secret-longer", b"secret"));
        assert!(!same_token(b"", b"secret"));
    }

    #[test]
    fn only_loopback_listeners_go_without_a_token() {
        assert!(loopback_only("127.0.0.1:80".parse().expect("address")));
        assert!(loopback_only("[::1]:80".parse().expect("address")));
        assert!(!loopback_only("0.0.0.0:80".parse().expect("address")));
        assert!(!loopback_only("192.168.1.5:80".parse().expect("address")));
    }
}
