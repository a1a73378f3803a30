//! The whole path in the scale-out setup, with real processes and real services: simulated
//! fleet -> agent -> QUIC -> collector (Kafka log, window processor, ClickHouse store) ->
//! query API, each test ending in an exact check against the fleet's ledger. The fault tests
//! stop the shared Kafka or ClickHouse of `deploy/dev/services.sh` and always start it again.

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tempfile::TempDir;
use tributary_firmware_sim::cluster::{
    metric_value, wait_for, Agent, AgentSpec, Collector, CollectorSpec,
};
use tributary_tests::e2e::{
    assert_store_matches_ledger, binaries, exclusive, fleet_config, wait_for_agent_readings,
    FleetRun,
};
use tributary_tests::services::{
    service_env, unique_suffix, CLICKHOUSE_URL, KAFKA_BROKERS, SERVICES_SCRIPT,
};

const AGENT_ID: &str = "gw-e2e-kafka";

struct Cluster {
    dir: TempDir,
    collector: Collector,
    agent: Agent,
}

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
    let binaries = binaries();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra_config = format!(
        "[log]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\n\
         [store]\nkind = \"clickhouse\"\nurl = \"{clickhouse}\"\ndatabase = \"tributary_e2e_{suffix}\"\n"
    );
    let collector = Collector::start(
        &binaries,
        &CollectorSpec {
            dir: dir.path().join("collector"),
            agent_ids: vec![AGENT_ID.into()],
            extra_config,
            api_port: None,
        },
    )
    .expect("collector starts");
    let spec = AgentSpec::new(dir.path().join("agent"), AGENT_ID, &collector).expect("spec");
    let agent = Agent::start(&binaries, &spec).expect("agent starts");
    Some(Cluster {
        dir,
        collector,
        agent,
    })
}

impl Cluster {
    fn check(&mut self, ledger: &tributary_tests::e2e::Ledger) {
        let report = assert_store_matches_ledger(
            ledger,
            &mut self.collector,
            &mut [&mut self.agent],
            Duration::from_secs(180),
        );
        assert!(report.windows_checked > 0);
    }

    fn stop(mut self) {
        assert!(self
            .agent
            .process
            .stop(Duration::from_secs(20))
            .expect("stop"));
        assert!(self
            .collector
            .process
            .stop(Duration::from_secs(30))
            .expect("stop"));
    }
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
    let fleet = FleetRun::start(
        fleet_config(4, 2.0, "duplicates,reorder,malformed", false),
        &cluster.agent,
        None,
        Duration::from_secs(12),
        cluster.dir.path(),
    );
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger);
    cluster.stop();
}

#[test]
fn kafka_stopped_for_a_while_makes_the_agent_buffer_and_loses_nothing() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = FleetRun::start(
        fleet_config(4, 2.0, "", false),
        &cluster.agent,
        None,
        Duration::from_secs(40),
        cluster.dir.path(),
    );
    wait_for_agent_readings(&mut cluster.agent, 100);
    let Some(mut kafka) = ServiceDown::stop("kafka") else {
        return;
    };
    let stopped_at = Instant::now();
    // Nothing can be acked while the log is down: the agent's buffer must hold a backlog.
    {
        let agent = &cluster.agent;
        wait_for(
            "the agent to buffer a backlog while Kafka is down",
            Duration::from_secs(90),
            || {
                let metrics = agent.metrics()?;
                let buffered =
                    metric_value(&metrics, "tributary_agent_buffer_batches", &[]).unwrap_or(0.0);
                Ok(
                    (stopped_at.elapsed() >= Duration::from_secs(20) && buffered >= 2.0)
                        .then_some(()),
                )
            },
        )
        .expect("backlog while Kafka is down");
    }
    kafka.start();
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger);
    cluster.stop();
}

#[test]
fn collector_kill_9_over_kafka_loses_nothing_and_counts_nothing_twice() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = FleetRun::start(
        fleet_config(4, 2.0, "", false),
        &cluster.agent,
        None,
        Duration::from_secs(16),
        cluster.dir.path(),
    );
    wait_for_agent_readings(&mut cluster.agent, 200);
    {
        let collector = &cluster.collector;
        wait_for(
            "the collector to take batches",
            Duration::from_secs(60),
            || {
                let metrics = collector.metrics()?;
                Ok(
                    (metric_value(&metrics, "tributary_ingest_batches_total", &[]).unwrap_or(0.0)
                        > 0.0)
                        .then_some(()),
                )
            },
        )
        .expect("batches arrive");
    }
    cluster.collector.process.kill9().expect("kill -9");
    cluster.collector.restart().expect("collector restarts");
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger);
    cluster.stop();
}

#[test]
fn clickhouse_stopped_for_30_seconds_pauses_and_resumes_with_nothing_lost() {
    let _turn = exclusive();
    let Some(mut cluster) = cluster() else {
        return;
    };
    let fleet = FleetRun::start(
        fleet_config(4, 2.0, "", false),
        &cluster.agent,
        None,
        Duration::from_secs(40),
        cluster.dir.path(),
    );
    wait_for_agent_readings(&mut cluster.agent, 100);
    let Some(mut clickhouse) = ServiceDown::stop("clickhouse") else {
        return;
    };
    let stopped_at = Instant::now();
    // The outage is the fault itself: 30 s of wall time while the fleet keeps publishing.
    wait_for("30 s of ClickHouse outage", Duration::from_secs(60), || {
        cluster.collector.process.check_running()?;
        Ok((stopped_at.elapsed() >= Duration::from_secs(30)).then_some(()))
    })
    .expect("outage");
    clickhouse.start();
    let (_, ledger) = fleet.finish();
    cluster.check(&ledger);
    cluster.stop();
}
