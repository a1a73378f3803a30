//! The cloud deployment files (`deploy/compose/`, `deploy/k8s/`) checked without a container
//! engine: every YAML document parses, and everything they point at exists in the code. The
//! collector configs they carry pass `tributary-collector check-config`; every subcommand and
//! flag they run is one the binary accepts; every port they publish or probe is the one the
//! config listens on; every health path they probe answers 200 from a real collector started
//! here (embedded log, no services); every volume, secret and config they mount is defined.
//!
//! YAML is parsed by PyYAML (python3-yaml, installed by deploy/dev/packaging-deps.sh) into
//! JSON, so this crate needs no YAML library.

mod packaging_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use packaging_support::*;
use serde_json::Value;
use tributary_collector::config::{CollectorConfig, LogConfig, StoreConfig};

/// A python3 that can `import yaml`.
fn python_with_yaml() -> Option<String> {
    let found = ["python3", "/usr/bin/python3"].into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|output| output.status.success())
    });
    if require_tool(
        found.is_some(),
        "python3 with PyYAML",
        "run deploy/dev/packaging-deps.sh (apt-get install python3-yaml)",
    ) {
        found.map(str::to_owned)
    } else {
        None
    }
}

/// Every YAML document of a file, as JSON values.
fn yaml_documents(python: &str, path: &Path) -> Vec<Value> {
    let json = run_ok(Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\nwith open(sys.argv[1]) as f:\n    print(json.dumps([d for d in yaml.safe_load_all(f) if d is not None]))",
        ])
        .arg(path));
    serde_json::from_str(&json).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn str_of<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn collector_binary() -> PathBuf {
    workspace_binary("tributary-collector")
}

/// `tributary-collector check-config` must accept the file, and the library must load it.
fn checked_collector_config(path: &Path) -> CollectorConfig {
    let stdout = run_ok(
        Command::new(collector_binary())
            .args(["check-config", "--config"])
            .arg(path),
    );
    assert!(stdout.contains("ok"), "{stdout}");
    CollectorConfig::load(path).unwrap_or_else(|error| panic!("{error}"))
}

/// The subcommand (and flags) a manifest runs must be accepted by the binary.
fn assert_collector_accepts(arguments: &[String]) {
    let subcommand = arguments.first().expect("a subcommand");
    let help = run_ok(Command::new(collector_binary()).args([subcommand.as_str(), "--help"]));
    for flag in arguments
        .iter()
        .filter(|argument| argument.starts_with("--"))
    {
        assert!(
            help.contains(flag.as_str()),
            "`tributary-collector {subcommand}` has no {flag}:\n{help}"
        );
    }
}

/// A real collector (ingest alone, embedded log) whose operators' HTTP port answers the
/// health paths the manifests probe.
struct RunningCollector {
    child: Child,
    metrics_address: String,
    _state: tempfile::TempDir,
}

impl RunningCollector {
    fn start() -> Self {
        let state = tempfile::tempdir().expect("temp dir");
        let metrics_address = format!("127.0.0.1:{}", free_port());
        let tokens = state.path().join("tokens");
        std::fs::write(&tokens, "# none\n").expect("tokens");
        let config = state.path().join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nmetrics_address = \"{metrics_address}\"\n[ingest]\nlisten_address = \"127.0.0.1:{quic_port}\"\ntokens_file = \"{}\"\n",
                state.path().join("state").display(),
                tokens.display(),
                quic_port = std::net::UdpSocket::bind("127.0.0.1:0")
                    .and_then(|socket| socket.local_addr())
                    .expect("a free UDP port")
                    .port(),
            ),
        )
        .expect("config");
        let child = Command::new(collector_binary())
            .args(["ingest", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the collector");
        let mut running = RunningCollector {
            child,
            metrics_address,
            _state: state,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_status(&running.metrics_address, "/healthz").is_none() {
            if let Ok(Some(status)) = running.child.try_wait() {
                panic!("the collector exited with {status} before serving HTTP");
            }
            assert!(
                Instant::now() < deadline,
                "collector HTTP not up within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }

    /// The path must answer 200 (readiness may take a moment after start).
    fn assert_path_answers(&self, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = http_status(&self.metrics_address, path);
            if status == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the collector answers GET {path} on its metrics address with {status:?}, not 200"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningCollector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(address: &std::net::SocketAddr) -> u64 {
    u64::from(address.port())
}

#[test]
fn compose_file_matches_the_code() {
    let Some(python) = python_with_yaml() else {
        return;
    };
    let directory = repo_root().join("deploy/compose");
    let documents = yaml_documents(&python, &directory.join("compose.yaml"));
    assert_eq!(documents.len(), 1);
    let compose = &documents[0];
    let services = compose["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["clickhouse", "collector", "grafana", "kafka", "kafka-init"])
    );
    for (name, service) in services {
        assert!(service["image"].is_string(), "{name} names its image");
        if let Some(depends) = service["depends_on"].as_object() {
            for dependency in depends.keys() {
                assert!(
                    services.contains_key(dependency),
                    "{name} depends on unknown {dependency}"
                );
            }
        }
        // Bind mounts point at files of the repository; named volumes are declared.
        for volume in strings(&service["volumes"]) {
            let source = volume.split(':').next().expect("source");
            if source.starts_with('.') {
                assert!(
                    directory.join(source).exists(),
                    "{name} mounts missing {source}"
                );
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name}: volume {source} undeclared"
                );
            }
        }
    }

    // The collector: its image is built here, its config passes check-config, its command
    // exists, and every port it publishes is one the config listens on.
    let collector = &services["collector"];
    assert_eq!(
        str_of(collector, "/build/dockerfile"),
        "deploy/compose/Dockerfile"
    );
    assert_eq!(str_of(collector, "/build/context"), "../..");
    let config = checked_collector_config(&directory.join("collector.toml"));
    let command = strings(&collector["command"]);
    assert_collector_accepts(&command);
    let config_mount = strings(&collector["volumes"])
        .into_iter()
        .find(|volume| volume.starts_with("./collector.toml:"))
        .expect("collector.toml mounted");
    let config_path_in_container = config_mount.split(':').nth(1).expect("target");
    assert_eq!(
        command.last().map(String::as_str),
        Some(config_path_in_container)
    );
    let tokens_mount = strings(&collector["volumes"])
        .into_iter()
        .find(|volume| volume.starts_with("./tokens:"))
        .expect("tokens mounted");
    assert_eq!(
        Path::new(tokens_mount.split(':').nth(1).expect("target")),
        config.ingest.tokens_file
    );
    tributary_collector::ingest::TokenStore::load(&directory.join("tokens"))
        .expect("the shipped tokens file parses");
    let published: BTreeMap<u64, String> = strings(&collector["ports"])
        .iter()
        .map(|port| {
            let (mapping, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
            let container_port = mapping.rsplit(':').next().expect("container port");
            (
                container_port.parse().expect("port number"),
                protocol.to_owned(),
            )
        })
        .collect();
    assert_eq!(
        published
            .get(&port_of(&config.ingest.listen_address))
            .map(String::as_str),
        Some("udp"),
        "QUIC on UDP"
    );
    assert_eq!(
        published
            .get(&port_of(&config.metrics_address))
            .map(String::as_str),
        Some("tcp")
    );
    assert_eq!(
        published
            .get(&port_of(&config.api.listen_address))
            .map(String::as_str),
        Some("tcp")
    );
    assert!(
        config.api.token.is_some(),
        "the API listens off loopback: it needs a token"
    );
    let health = strings(&collector["healthcheck"]["test"]);
    let url = health
        .iter()
        .find(|part| part.starts_with("http://"))
        .expect("health URL");
    let expected_prefix = format!("http://127.0.0.1:{}/", config.metrics_address.port());
    let health_path = url
        .strip_prefix(&expected_prefix[..expected_prefix.len() - 1])
        .unwrap_or_else(|| panic!("{url} is not on the metrics port"));
    let env_names: BTreeSet<&str> = collector["environment"]
        .as_object()
        .map(|env| env.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert!(
        env_names.iter().all(|name| *name == "RUST_LOG"),
        "the collector reads no other variable: {env_names:?}"
    );

    // Kafka: the topic the collector writes is the one kafka-init creates, as the log needs it.
    let LogConfig::Kafka(kafka) = &config.log else {
        panic!("compose uses the Kafka log")
    };
    assert_eq!(kafka.brokers, "kafka:9092");
    assert!(str_of(
        &services["kafka"],
        "/environment/KAFKA_ADVERTISED_LISTENERS"
    )
    .contains("kafka:9092"));
    let init = strings(&services["kafka-init"]["command"]).join(" ");
    assert!(init.contains(&format!("--topic {}", kafka.topic)), "{init}");
    assert!(
        init.contains("message.timestamp.type=LogAppendTime"),
        "{init}"
    );
    assert_eq!(
        str_of(&services["kafka-init"], "/depends_on/kafka/condition"),
        "service_healthy"
    );

    // ClickHouse: the store's credentials and database are the server's.
    let StoreConfig::ClickHouse(store) = &config.store else {
        panic!("compose uses ClickHouse")
    };
    let clickhouse_env = &services["clickhouse"]["environment"];
    assert_eq!(store.url, "http://clickhouse:8123");
    assert_eq!(
        Some(str_of(clickhouse_env, "/CLICKHOUSE_USER")),
        store.user.as_deref()
    );
    assert_eq!(
        Some(str_of(clickhouse_env, "/CLICKHOUSE_PASSWORD")),
        store.password.as_deref()
    );
    assert_eq!(str_of(clickhouse_env, "/CLICKHOUSE_DB"), store.database);

    // Grafana: the provisioning's ${VARIABLES} are all set, they point at this ClickHouse,
    // and the dashboards are mounted where the provider looks.
    let grafana = &services["grafana"];
    let grafana_env = grafana["environment"]
        .as_object()
        .expect("grafana environment");
    let provisioning = repo_root().join("deploy/grafana/provisioning");
    let datasource = read(&provisioning.join("datasources/tributary-clickhouse.yaml"));
    let mut referenced = BTreeSet::new();
    for piece in datasource.split("${").skip(1) {
        let name = piece.split('}').next().expect("closing brace");
        referenced.insert(name.to_owned());
        assert!(
            grafana_env.contains_key(name),
            "grafana's environment lacks {name}"
        );
    }
    assert!(!referenced.is_empty());
    assert_eq!(
        str_of(grafana, "/environment/CLICKHOUSE_HOST"),
        "clickhouse"
    );
    assert_eq!(
        Some(str_of(grafana, "/environment/CLICKHOUSE_USER")),
        store.user.as_deref()
    );
    assert_eq!(
        Some(str_of(grafana, "/environment/CLICKHOUSE_PASSWORD")),
        store.password.as_deref()
    );
    let provider = yaml_documents(&python, &provisioning.join("dashboards/tributary.yaml"));
    let dashboards_path = str_of(&provider[0], "/providers/0/options/path");
    assert!(
        strings(&grafana["volumes"])
            .contains(&format!("../grafana/dashboards:{dashboards_path}:ro")),
        "dashboards mounted at the provider's path {dashboards_path}"
    );

    // The image: the Dockerfile builds this package and exposes the same ports.
    let dockerfile = read(&directory.join("Dockerfile"));
    assert!(dockerfile.contains("-p tributary-collector"));
    assert!(dockerfile.contains("ENTRYPOINT [\"tributary-collector\"]"));
    for port in [
        format!("{}/udp", config.ingest.listen_address.port()),
        format!("{}/tcp", config.metrics_address.port()),
        format!("{}/tcp", config.api.listen_address.port()),
    ] {
        assert!(
            dockerfile.contains(&port),
            "the Dockerfile does not EXPOSE {port}"
        );
    }

    let collector_process = RunningCollector::start();
    collector_process.assert_path_answers(health_path);
}

/// Documents of the k8s directory by `kind/name`.
fn k8s_objects(python: &str) -> BTreeMap<String, Value> {
    let directory = repo_root().join("deploy/k8s");
    let mut objects = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&directory)
        .expect("deploy/k8s")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        for document in yaml_documents(python, &file) {
            let key = format!(
                "{}/{}",
                str_of(&document, "/kind"),
                str_of(&document, "/metadata/name")
            );
            assert!(
                document["apiVersion"].is_string(),
                "{key} has an apiVersion"
            );
            assert!(
                objects.insert(key.clone(), document).is_none(),
                "{key} twice"
            );
        }
    }
    objects
}

#[test]
fn kubernetes_manifests_match_the_code() {
    let Some(python) = python_with_yaml() else {
        return;
    };
    let objects = k8s_objects(&python);
    let object = |key: &str| -> &Value {
        objects
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in deploy/k8s; have {:?}", objects.keys()))
    };

    // The config map's collector.toml passes check-config.
    let config_map = object("ConfigMap/tributary-collector");
    let scratch = tempfile::tempdir().expect("temp dir");
    let config_path = scratch.path().join("collector.toml");
    std::fs::write(&config_path, str_of(config_map, "/data/collector.toml")).expect("write");
    let config = checked_collector_config(&config_path);
    assert!(
        matches!(config.log, LogConfig::Kafka(_)),
        "processors share a Kafka topic"
    );
    let cert_file = config
        .ingest
        .tls
        .cert_file
        .clone()
        .expect("replicas share one certificate");
    let key_file = config.ingest.tls.key_file.clone().expect("and its key");

    let collector_process = RunningCollector::start();
    let mut probed = 0;
    for (workload, subcommand) in [
        ("Deployment/tributary-ingest", "ingest"),
        ("StatefulSet/tributary-processor", "process"),
    ] {
        let spec = &object(workload)["spec"]["template"]["spec"];
        let volumes: BTreeMap<String, &Value> = spec["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .map(|volume| (str_of(volume, "/name").to_owned(), volume))
            .collect();
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "{workload}");
        let container = &containers[0];
        assert!(str_of(container, "/image").starts_with("tributary-collector:"));

        // The command: a subcommand the binary has, with flags it accepts, on the mounted config.
        let mut arguments = strings(&container["command"]);
        arguments.extend(strings(&container["args"]));
        let line = arguments.join(" ");
        let words: Vec<String> = line
            .split_whitespace()
            .map(|word| word.trim_matches('"').to_owned())
            .skip_while(|word| word != "ingest" && word != "process")
            .collect();
        assert_eq!(
            words.first().map(String::as_str),
            Some(subcommand),
            "{workload}: {line}"
        );
        assert_collector_accepts(&words);
        let config_argument = words
            .iter()
            .skip_while(|word| *word != "--config")
            .nth(1)
            .expect("--config PATH");
        let mounts = container["volumeMounts"].as_array().expect("mounts");
        let mount_of = |path: &str| {
            mounts
                .iter()
                .filter(|mount| path.starts_with(str_of(mount, "/mountPath")))
                .max_by_key(|mount| str_of(mount, "/mountPath").len())
                .unwrap_or_else(|| panic!("{workload}: nothing mounted at {path}"))
        };
        assert_eq!(str_of(mount_of(config_argument), "/name"), "config");
        assert_eq!(
            str_of(volumes["config"], "/configMap/name"),
            "tributary-collector"
        );
        assert_eq!(
            Path::new(str_of(
                mount_of(&config.state_dir.display().to_string()),
                "/mountPath"
            )),
            config.state_dir
        );
        for mount in mounts {
            assert!(
                volumes.contains_key(str_of(mount, "/name")),
                "{workload}: undefined volume"
            );
        }

        // Ports: the metrics port is the config's, probes hit real endpoints on it.
        let ports: BTreeMap<String, (u64, String)> = container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|port| {
                (
                    str_of(port, "/name").to_owned(),
                    (
                        port["containerPort"].as_u64().expect("port"),
                        str_of(port, "/protocol").to_owned(),
                    ),
                )
            })
            .collect();
        assert_eq!(
            ports["metrics"],
            (port_of(&config.metrics_address), "TCP".to_owned())
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            let path = str_of(container, &format!("/{probe}/httpGet/path"));
            let port = str_of(container, &format!("/{probe}/httpGet/port"));
            assert_eq!(port, "metrics", "{workload} {probe}");
            collector_process.assert_path_answers(path);
            probed += 1;
        }
        for resource in ["requests", "limits"] {
            for kind in ["cpu", "memory"] {
                assert!(
                    container["resources"][resource][kind].is_string(),
                    "{workload}: resources.{resource}.{kind}"
                );
            }
        }

        if subcommand == "ingest" {
            assert_eq!(
                ports["quic"],
                (port_of(&config.ingest.listen_address), "UDP".to_owned())
            );
            // Tokens and TLS come from Secrets, mounted where the config looks for them.
            let tokens_mount = mount_of(&config.ingest.tokens_file.display().to_string());
            let tokens_volume = volumes[str_of(tokens_mount, "/name")];
            let tokens_secret = str_of(tokens_volume, "/secret/secretName");
            let key = config
                .ingest
                .tokens_file
                .file_name()
                .and_then(|name| name.to_str())
                .expect("file name");
            let secret = object(&format!("Secret/{tokens_secret}"));
            let tokens_text = str_of(secret, &format!("/stringData/{key}"));
            tributary_collector::ingest::TokenStore::parse(tokens_text, Path::new(key))
                .expect("the shipped tokens parse");
            for file in [&cert_file, &key_file] {
                let mount = mount_of(&file.display().to_string());
                let volume = volumes[str_of(mount, "/name")];
                assert_eq!(
                    str_of(volume, "/secret/secretName"),
                    "tributary-collector-tls"
                );
                let name = file
                    .file_name()
                    .and_then(|name| name.to_str())
                    .expect("file name");
                assert!(
                    ["tls.crt", "tls.key"].contains(&name),
                    "keys of a kubernetes.io/tls Secret"
                );
            }
            let service = object("Service/tributary-ingest");
            let service_port = &service["spec"]["ports"][0];
            assert_eq!(str_of(service_port, "/protocol"), "UDP");
            assert_eq!(str_of(service_port, "/targetPort"), "quic");
            assert_eq!(
                service["spec"]["selector"],
                object(workload)["spec"]["selector"]["matchLabels"]
            );
        } else {
            // Shares: INDEX/COUNT with COUNT = replicas.
            let share = words
                .iter()
                .skip_while(|word| *word != "--partitions")
                .nth(1)
                .expect("--partitions");
            let count: u64 = share
                .rsplit('/')
                .next()
                .and_then(|count| count.parse().ok())
                .expect("INDEX/COUNT");
            assert_eq!(
                Some(count),
                object(workload)["spec"]["replicas"].as_u64(),
                "one share per replica"
            );
            assert_eq!(
                str_of(object(workload), "/spec/serviceName"),
                str_of(object("Service/tributary-processor"), "/metadata/name")
            );
            for index in 0..count {
                format!("{index}/{count}")
                    .parse::<tributary_collector::pipeline::PartitionAssignment>()
                    .unwrap_or_else(|error| panic!("share {index}/{count}: {error}"));
            }
        }
    }
    assert_eq!(probed, 4);
}
