//! The whole path in the scale-out setup, with real processes and real services: simulated
//! fleet -> agent -> QUIC -> collector (Kafka log, window processor, ClickHouse store) ->
//! query API, each test ending in an exact check against the fleet's ledger. The fault tests
//! stop the shared Kafka or ClickHouse of `deploy/dev/services.sh` and always start it again.

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tributary_firmware_sim::cluster::metric_value;
use tributary_tests::e2e::{
    exclusive, fleet_config, wait_for_agent_readings, wait_for_metric, Cluster, ClusterOptions,
};
use tributary_tests::services::{
    service_env, unique_suffix, CLICKHOUSE_URL, KAFKA_BROKERS, SERVICES_SCRIPT,
};

const AGENT_ID: &str = "gw-e2e-kafka";
const CHECK_TIMEOUT: Duration = Duration::from_secs(180);

fn create_topic(brokers: &str, topic: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("kafka admin client");
        let new_topic = NewTopic::new(topic, 2, TopicReplication::Fixed(1))
            .set("message.timestamp.type", "LogAppendTime");
        let results = admin
            .create_topics(&[new_topic], &AdminOptions::new())
            .await
            .unwrap_or_else(|error| panic!("kafka at {brokers}: create topic {topic}: {error}"));
        for result in results {
            if let Err((name, code)) = result {
                panic!("kafka at {brokers}: create topic {name}: {code}");
            }
        }
    });
}

fn cluster() -> Option<Cluster> {
    let brokers = service_env(KAFKA_BROKERS)?;
    let clickhouse = service_env(CLICKHOUSE_URL)?;
    let suffix = unique_suffix();
    let topic = format!("tributary.e2e.{suffix}");
    create_topic(&brokers, &topic);
    let extra_config = format!(
        "[log]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\n\
         [store]\nkind = \"clickhouse\"\nurl = \"{clickhouse}\"\ndatabase = \"tributary_e2e_{suffix}\"\n"
    );
    Some(Cluster::start(
        ClusterOptions {
            extra_config,
            ..ClusterOptions::embedded(AGENT_ID)
        },
        |_| {},
    ))
}

/// A shared service stopped for a test; started again when dropped, even on failure.
struct ServiceDown {
    script: String,
    name: &'static str,
    down: bool,
}

fn services(script: &str, action: &str, name: &str) {
    let status = Command::new("bash")
        .args([script, action, name])
        .status()
        .unwrap_or_else(|error| panic!("running {script} {action} {name}: {error}"));
    assert!(
        status.success(),
        "{script} {action} {name} failed: {status}"
    );
}

impl ServiceDown {
    fn stop(name: &'static str) -> Option<Self> {
        let script = service_env(SERVICES_SCRIPT)?;
        services(&script, "stop", name);
        Some(Self {
            script,
            name,
            down: true,
        })
    }

    fn start(&mut self) {
        if self.down {
            services(&self.script, "start", self.name);
            self.down = false;
        }
    }
}

impl Drop for ServiceDown {
    fn drop(&mut self) {
        self.start();
    }
}

#[test]
fn a_faulty_fleet_arrives_exactly_once_through_kafka_into_clickhouse() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = cluster.fleet(
        fleet_config(4, 2.0, "duplicates,reorder,malformed", false),
        Duration::from_secs(12),
    );
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger, CHECK_TIMEOUT);
    cluster.stop();
}

#[test]
fn kafka_stopped_for_a_while_makes_the_agent_buffer_and_loses_nothing() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = cluster.fleet(fleet_config(4, 2.0, "", false), Duration::from_secs(40));
    wait_for_agent_readings(&mut cluster.agent, 100);
    let Some(mut kafka) = ServiceDown::stop("kafka") else {
        return;
    };
    let stopped_at = Instant::now();
    // Nothing can be acked while the log is down: the agent's buffer must hold a backlog.
    let agent = &cluster.agent;
    wait_for_metric(
        "the agent to buffer a backlog while Kafka is down",
        || agent.metrics(),
        |metrics| {
            let buffered =
                metric_value(metrics, "tributary_agent_buffer_batches", &[]).unwrap_or(0.0);
            stopped_at.elapsed() >= Duration::from_secs(20) && buffered >= 2.0
        },
    );
    kafka.start();
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger, CHECK_TIMEOUT);
    cluster.stop();
}

#[test]
fn collector_kill_9_over_kafka_loses_nothing_and_counts_nothing_twice() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = cluster.fleet(fleet_config(4, 2.0, "", false), Duration::from_secs(16));
    wait_for_agent_readings(&mut cluster.agent, 200);
    cluster.kill9_collector_and_restart();
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger, CHECK_TIMEOUT);
    cluster.stop();
}

#[test]
fn clickhouse_stopped_for_30_seconds_pauses_and_resumes_with_nothing_lost() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = cluster.fleet(fleet_config(4, 2.0, "", false), Duration::from_secs(40));
    wait_for_agent_readings(&mut cluster.agent, 100);
    let Some(mut clickhouse) = ServiceDown::stop("clickhouse") else {
        return;
    };
    let stopped_at = Instant::now();
    // The outage is the fault itself: 30 s of wall time while the fleet keeps publishing.
    let collector = &cluster.collector;
    wait_for_metric(
        "30 s of ClickHouse outage",
        || collector.metrics(),
        |_| stopped_at.elapsed() >= Duration::from_secs(30),
    );
    clickhouse.start();
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger, CHECK_TIMEOUT);
    cluster.stop();
}
