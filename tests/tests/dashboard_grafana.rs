//! The Grafana provisioning in `deploy/grafana/`: the fleet dashboard's SQL is exactly what
//! the store's query builders render (`collector/src/store/schema.rs`), which
//! `collector/tests/store_clickhouse_sql.rs` runs on a current ClickHouse engine (chdb) with
//! asserted results. Grafana's `${__from}`/`${__to}` (the time range in ms) and the
//! `$device`/`$metric`/`$tags` variables stand where the builders take arguments.
//!
//! After changing a query builder, regenerate the dashboard's SQL with
//! `TRIBUTARY_BLESS=1 cargo test -p tributary-tests --test dashboard_grafana` and commit it.

use serde_json::Value;
use tributary_collector::store::schema::{self, SeriesSelector};
use tributary_tests::services::repo_root;

const DATABASE: &str = "tributary";
const FINEST_RESOLUTION_MS: i64 = 60_000;
/// Stand-ins for `${__from}` and `${__to}`: integers no real query uses.
const FROM_SENTINEL: i64 = 1_111_111_111_111;
const TO_SENTINEL: i64 = 2_222_222_222_222;

fn grafana(sql: String) -> String {
    sql.replace(&FROM_SENTINEL.to_string(), "${__from}")
        .replace(&TO_SENTINEL.to_string(), "${__to}")
}

/// The SQL each panel must run, by panel title.
fn expected_sql(title: &str) -> Option<String> {
    let selected = [SeriesSelector {
        device_id: "${device}".into(),
        metric: "${metric}".into(),
        tags: "${tags}".into(),
    }];
    Some(match title {
        "Devices" => schema::sql_list_devices(DATABASE),
        "Series" => schema::sql_list_series(DATABASE),
        "Latest value per series" => schema::sql_latest_values(DATABASE, FINEST_RESOLUTION_MS, &[]),
        "Windows of $device / $metric (1 min): min, max, p50, p90, p99" => grafana(
            schema::sql_rollup_range(
                DATABASE,
                FINEST_RESOLUTION_MS,
                &selected,
                FROM_SENTINEL,
                TO_SENTINEL,
            )
            .expect("a selection"),
        ),
        "Raw readings of $device / $metric" => grafana(
            schema::sql_raw_range(DATABASE, &selected, FROM_SENTINEL, TO_SENTINEL)
                .expect("a selection"),
        ),
        "Late data in the time range" => grafana(schema::sql_late_counts(
            DATABASE,
            FROM_SENTINEL,
            TO_SENTINEL,
        )),
        _ => return None,
    })
}

#[test]
fn the_fleet_dashboard_runs_exactly_the_checked_queries() {
    let path = repo_root().join("deploy/grafana/dashboards/tributary-fleet.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()));
    let bless = std::env::var("TRIBUTARY_BLESS").is_ok_and(|value| value == "1");

    let panels = dashboard["panels"].as_array_mut().expect("panels");
    assert!(panels.len() >= 6, "the dashboard lost panels");
    let mut differences = Vec::new();
    for panel in panels.iter_mut() {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        let expected = expected_sql(&title).unwrap_or_else(|| {
            panic!("panel {title:?} has no known query; add it to expected_sql")
        });
        assert_eq!(
            panel["datasource"]["uid"], "tributary-clickhouse",
            "{title}: the provisioned data source"
        );
        let targets = panel["targets"].as_array_mut().expect("targets");
        assert_eq!(targets.len(), 1, "{title}: one query per panel");
        if bless {
            targets[0]["rawSql"] = Value::String(expected.clone());
        }
        let actual = targets[0]["rawSql"].as_str().unwrap_or_default();
        if actual != expected {
            differences.push(format!(
                "{title}:\n  dashboard: {actual}\n  store:     {expected}"
            ));
        }
    }
    if bless {
        let rendered = serde_json::to_string_pretty(&dashboard).expect("render") + "\n";
        std::fs::write(&path, rendered).expect("write the dashboard");
    }
    assert!(
        differences.is_empty(),
        "the dashboard's SQL differs from the store's queries (rerun with TRIBUTARY_BLESS=1):\n{}",
        differences.join("\n")
    );
}

#[test]
fn the_provisioning_points_at_the_dashboard_and_data_source() {
    let root = repo_root().join("deploy/grafana/provisioning");
    let datasource = std::fs::read_to_string(root.join("datasources/tributary-clickhouse.yaml"))
        .expect("data source");
    assert!(datasource.contains("type: grafana-clickhouse-datasource"));
    assert!(datasource.contains("uid: tributary-clickhouse"));
    assert!(datasource.contains(&format!("defaultDatabase: {DATABASE}")));
    let provider =
        std::fs::read_to_string(root.join("dashboards/tributary.yaml")).expect("provider");
    assert!(provider.contains("type: file"));
    assert!(provider.contains("path: /var/lib/grafana/dashboards/tributary"));
}
