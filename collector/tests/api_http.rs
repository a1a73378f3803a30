//! The query API over real HTTP against an embedded store filled with known rows: every
//! route's answer, the 4xx answers for bad parameters, token checks, and the OpenAPI
//! document describing exactly the routes the router serves.

mod api_support;

use std::collections::BTreeSet;

use api_support::*;
use serde_json::Value;
use tributary_collector::api::{self, ROUTES};
use tributary_collector::live::LiveFeed;

fn values_of(answer: &Value, list: &str, field: &str) -> Vec<Value> {
    answer[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} is not a list in {answer}"))
        .iter()
        .map(|item| item[field].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_from_the_store() {
    let fixture = fixture().await;
    let server = start(state(fixture.queries.clone(), LiveFeed::new(8), None)).await;
    let address = server.address;

    let info = get(address, "/api/v1/info", None).await;
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.header("content-type"), Some("application/json"));
    let info = info.json();
    assert_eq!(info["now_ms"], NOW_MS);
    assert_eq!(
        info["resolutions_ms"],
        serde_json::json!([MINUTE_MS, HOUR_MS])
    );

    let agents = get(address, "/api/v1/agents", None).await.json();
    assert_eq!(
        agents["agents"],
        serde_json::json!([]),
        "no agent connected to this process"
    );
    assert_eq!(
        (agents["online"].as_u64(), agents["offline"].as_u64()),
        (Some(0), Some(0))
    );

    let devices = get(address, "/api/v1/devices", None).await.json();
    assert_eq!(values_of(&devices, "devices", "device_id"), ["d1", "d2"]);
    assert_eq!(
        values_of(&devices, "devices", "last_agent_id"),
        ["gw-1", "gw-2"]
    );
    assert_eq!(devices["devices"][0]["last_seen_ms"], T0 + 9 * MINUTE_MS);

    let series = get(address, "/api/v1/series", None).await.json();
    assert_eq!(
        values_of(&series, "series", "selector"),
        [
            "d1/humidity_pct/zone=north",
            "d1/temperature_c",
            "d2/pressure_hpa"
        ]
    );
    let d1 = get(address, "/api/v1/devices/d1/series", None).await.json();
    assert_eq!(
        values_of(&d1, "series", "metric"),
        ["humidity_pct", "temperature_c"]
    );
    assert_eq!(d1["series"][0]["tags"], "zone=north");

    let latest = get(address, "/api/v1/latest", None).await.json();
    assert_eq!(values_of(&latest, "values", "value"), [40.0, 22.5, 1013.25]);
    assert_eq!(latest["values"][1]["time_ms"], T0 + 61_000);
    let latest_one = get(address, "/api/v1/latest?series=d2/pressure_hpa", None)
        .await
        .json();
    assert_eq!(
        values_of(&latest_one, "values", "selector"),
        ["d2/pressure_hpa"]
    );

    let range_path = format!(
        "/api/v1/range?series=d1/temperature_c&series=d2/pressure_hpa&from_ms={T0}&to_ms={}",
        T0 + 10 * MINUTE_MS
    );
    let range = get(address, &range_path, None).await.json();
    assert_eq!(range["resolution_ms"], MINUTE_MS, "the finest by default");
    let windows = range["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 3, "{range}");
    assert_eq!(windows[0]["window_start_ms"], T0);
    assert_eq!(windows[0]["count"], 2);
    assert_eq!(windows[0]["sum"], 41.0);
    assert_eq!(windows[0]["mean"], 20.5);
    assert_eq!(windows[0]["is_final"], true);
    assert_eq!(windows[1]["window_start_ms"], T0 + MINUTE_MS);
    assert_eq!(windows[1]["is_final"], false);
    assert_eq!(windows[2]["selector"], "d2/pressure_hpa");
    assert!(
        windows[0]["p50"]
            .as_f64()
            .is_some_and(|p50| (p50 - 20.0).abs() < 0.5),
        "{}",
        windows[0]
    );

    let hourly = get(
        address,
        &format!(
            "/api/v1/range?series=d1/temperature_c&resolution_ms={HOUR_MS}&from_ms={T0}&to_ms={}",
            T0 + HOUR_MS
        ),
        None,
    )
    .await
    .json();
    assert_eq!(hourly["windows"][0]["count"], 3, "{hourly}");
    assert_eq!(hourly["windows"][0]["max"], 22.5);

    // The tags part of a selector, percent-encoded in the URL ('=' as %3D).
    let raw = get(
        address,
        &format!("/api/v1/raw?series=d1/temperature_c&series=d1/humidity_pct/zone%3Dnorth&from_ms={T0}&to_ms={}", T0 + 60_000),
        None,
    )
    .await
    .json();
    assert_eq!(
        values_of(&raw, "readings", "value"),
        [40.0, 20.0, 21.0],
        "22.5 is outside [from, to)"
    );
    assert_eq!(raw["readings"][1]["batch_seq"], 1);

    let late = get(
        address,
        &format!("/api/v1/late?from_ms={T0}&to_ms={}", T0 + HOUR_MS),
        None,
    )
    .await
    .json();
    let counts = late["counts"].as_array().expect("counts");
    assert_eq!(counts.len(), 1, "{late}");
    assert_eq!(counts[0]["reason"], "window_closed");
    assert_eq!(counts[0]["late_rows"], 2);
    assert_eq!(counts[0]["late_readings"], 11);

    let page = get(address, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("/assets/dashboard.js"),
        "the page loads its script"
    );
    for asset in ["/assets/dashboard.js", "/assets/dashboard.css"] {
        assert_eq!(get(address, asset, None).await.status, 200, "{asset}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_a_4xx_that_names_them() {
    let fixture = fixture().await;
    let server = start(state(fixture.queries.clone(), LiveFeed::new(8), None)).await;
    let address = server.address;
    let to = T0 + MINUTE_MS;
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("/api/v1/range?from_ms={T0}&to_ms={to}"),
            400,
            "series: required",
        ),
        (
            format!("/api/v1/range?series=d1&from_ms={T0}&to_ms={to}"),
            400,
            "series: \"d1\" is not a series selector",
        ),
        (
            format!("/api/v1/range?series=d1/temperature_c&to_ms={to}"),
            400,
            "from_ms: required",
        ),
        (
            format!("/api/v1/range?series=d1/temperature_c&from_ms=yesterday&to_ms={to}"),
            400,
            "from_ms: \"yesterday\" is not an integer",
        ),
        (
            format!("/api/v1/range?series=d1/temperature_c&from_ms={to}&to_ms={T0}"),
            400,
            "to_ms:",
        ),
        (
            format!(
                "/api/v1/range?series=d1/temperature_c&resolution_ms=5000&from_ms={T0}&to_ms={to}"
            ),
            400,
            "resolution_ms: the store keeps no 5000 ms rollups; choose one of: 60000, 3600000",
        ),
        (
            format!("/api/v1/range?series=d1/temperature_c&from_ms=0&to_ms={to}"),
            400,
            "to_ms: the range spans",
        ),
        (
            format!(
                "/api/v1/raw?series=d1/temperature_c&from_ms={T0}&to_ms={to}&resolution_ms=60000"
            ),
            400,
            "resolution_ms: unknown parameter",
        ),
        (
            format!(
                "/api/v1/raw?series=d1/temperature_c&from_ms={}&to_ms={to}",
                to - 2 * 86_400_000
            ),
            400,
            "to_ms: the range spans",
        ),
        ("/api/v1/late?from_ms=1".to_string(), 400, "to_ms: required"),
        (
            "/api/v1/latest?series=%ZZ".to_string(),
            400,
            "series: \"%ZZ\" is not a series selector",
        ),
        (
            "/api/v1/devices?limit=5".to_string(),
            400,
            "limit: unknown parameter",
        ),
        (
            "/api/v1/devices/nope/series".to_string(),
            404,
            "no device \"nope\"",
        ),
        (
            "/api/v2/devices".to_string(),
            404,
            "no route GET /api/v2/devices",
        ),
        ("/api/v1/live".to_string(), 400, ""),
    ];
    for (path, status, message) in cases {
        let answer = get(address, &path, None).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
        if !message.is_empty() {
            let error = answer.error();
            assert!(
                error.contains(message),
                "{path}: {error:?} should contain {message:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required() {
    let fixture = fixture().await;
    let server = start(state(
        fixture.queries.clone(),
        LiveFeed::new(8),
        Some("s3cret-token"),
    ))
    .await;
    let address = server.address;

    let missing = get(address, "/api/v1/devices", None).await;
    assert_eq!(missing.status, 401);
    assert!(
        missing.error().contains("Authorization: Bearer"),
        "{}",
        missing.body
    );
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"tributary\"")
    );
    let wrong = get(address, "/api/v1/devices", Some("guess")).await;
    assert_eq!(wrong.status, 401);
    let right = get(address, "/api/v1/devices", Some("s3cret-token")).await;
    assert_eq!(right.status, 200, "{}", right.body);
    // The query-string token is only for the WebSocket.
    let in_query = get(address, "/api/v1/devices?access_token=s3cret-token", None).await;
    assert_eq!(in_query.status, 401);

    // What carries no data stays open: the page, its assets and the API description.
    for path in ["/", "/assets/dashboard.js", "/api/v1/openapi.json"] {
        assert_eq!(get(address, path, None).await.status, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_loopback_is_served() {
    let fixture = fixture().await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let error = api::serve(
        listener,
        state(fixture.queries.clone(), LiveFeed::new(8), None),
        async {},
    )
    .await
    .expect_err("an open API on every interface is refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("api.token"), "{error}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let error = api::serve(
        listener,
        state(fixture.queries.clone(), LiveFeed::new(8), Some(" ")),
        async {},
    )
    .await
    .expect_err("an empty token is refused");
    assert!(error.to_string().contains("empty"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_the_router_has() {
    let fixture = fixture().await;
    let server = start(state(fixture.queries.clone(), LiveFeed::new(8), None)).await;
    let answer = get(server.address, "/api/v1/openapi.json", None).await;
    assert_eq!(answer.status, 200);
    let document = answer.json();
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|version| version.starts_with("3.")));
    assert_eq!(answer.body.trim(), api::OPENAPI_JSON.trim());

    let mut described = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            described.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(
        described, routed,
        "the OpenAPI paths and the router's routes differ"
    );

    // Every listed route is really routed (the fallback's "no route" never answers), and every
    // schema reference resolves.
    for (_, path) in &routed {
        let concrete = path.replace("{device_id}", "d1");
        let answer = get(server.address, &concrete, None).await;
        let routed_error = answer.body.contains("no route");
        assert!(
            !routed_error,
            "{path} is in ROUTES but the router does not serve it: {}",
            answer.body
        );
    }
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for reference in answer
        .body
        .split("\"$ref\": \"#/components/schemas/")
        .skip(1)
    {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "$ref to missing schema {name}");
    }
}
