#!/usr/bin/env bash
# Starts the real services Tributary's tests run against: Mosquitto, ClickHouse server, a
# single-node Kafka 4.x in KRaft mode, and the chdb Python package (a current ClickHouse engine
# in-process, used to check our SQL).
#
# Why a script and not a compose file: CI machines and dev boxes here are plain Debian without a
# container runtime or systemd. Everything runs as our own processes on 127.0.0.1, on non-default
# ports (so a system broker or database never clashes), with all state under one directory that
# `down` + `rm -rf` removes completely.
#
# Usage: services.sh up|down|status|env|start NAME|stop NAME   (NAME: mosquitto|clickhouse|kafka)
# See deploy/dev/README.md for ports and environment variables.
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)
STATE_DIR=${TRIBUTARY_SERVICES_DIR:-$REPO_DIR/.services}
CACHE_DIR=${TRIBUTARY_CACHE_DIR:-/var/cache/tributary}

# The ports `up` chose are recorded in the state dir, so a later `start NAME` (a fault test
# restarting a service it stopped) binds the same ports even when its environment lacks the
# TRIBUTARY_*_PORT overrides; without this, a restarted service could land on the default port
# of another set of services on the same machine.
if [[ -f $STATE_DIR/ports ]]; then
    # shellcheck disable=SC1091
    source "$STATE_DIR/ports"
fi
MQTT_PORT=${TRIBUTARY_MQTT_PORT:-${RECORDED_MQTT_PORT:-18830}}
CLICKHOUSE_HTTP_PORT=${TRIBUTARY_CLICKHOUSE_HTTP_PORT:-${RECORDED_CLICKHOUSE_HTTP_PORT:-18123}}
CLICKHOUSE_TCP_PORT=${TRIBUTARY_CLICKHOUSE_TCP_PORT:-${RECORDED_CLICKHOUSE_TCP_PORT:-19000}}
KAFKA_PORT=${TRIBUTARY_KAFKA_PORT:-${RECORDED_KAFKA_PORT:-19092}}
KAFKA_CONTROLLER_PORT=${TRIBUTARY_KAFKA_CONTROLLER_PORT:-${RECORDED_KAFKA_CONTROLLER_PORT:-19093}}
KAFKA_VERSION=${TRIBUTARY_KAFKA_VERSION:-4.4.0}
# TOPIC:PARTITIONS, created on every `up`/`start kafka` if missing.
KAFKA_TOPICS=${TRIBUTARY_KAFKA_TOPICS:-tributary.batches:4}
KAFKA_HEAP=${TRIBUTARY_KAFKA_HEAP:--Xms256m -Xmx768m}

READY_TIMEOUT_S=${TRIBUTARY_READY_TIMEOUT_S:-180}
STOP_TIMEOUT_S=${TRIBUTARY_STOP_TIMEOUT_S:-45}
KAFKA_JARS_DIR=$CACHE_DIR/kafka-$KAFKA_VERSION
ALL_SERVICES=(mosquitto clickhouse kafka)

say() { echo "services: $*"; }

CHDB_VERSION_PY='import chdb; print(chdb.__version__, "(ClickHouse engine " + chdb.query("SELECT version()", "TSV").bytes().decode().strip() + ")")'


# Prints why a service failed, the tail of its log, and exits non-zero.
fail() {
    local name=$1 message=$2 log_file=${3:-}
    echo "services: ERROR: $name: $message" >&2
    if [[ -n $log_file && -f $log_file ]]; then
        echo "services: ---- last 40 lines of $log_file ----" >&2
        tail -n 40 "$log_file" >&2 || true
        echo "services: ---- end of $log_file ----" >&2
    fi
    exit 1
}

now_s() { date +%s; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_file() { echo "$STATE_DIR/$1/$1.pid"; }

# The pid of a service we started and that is still alive, or nothing. The command line is checked
# so that a recycled pid is never mistaken for (or killed as) our service.
service_pid() {
    local name=$1 file pid pattern
    file=$(pid_file "$name")
    [[ -f $file ]] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    case $name in
        mosquitto) pattern=mosquitto ;;
        clickhouse) pattern=clickhouse ;;
        kafka) pattern=kafka.Kafka ;;
    esac
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$pattern"; then
        echo "$pid"
    fi
}

# Polls CHECK (a shell function/command) every 0.2 s until it succeeds, the service's process dies,
# or the deadline passes. No fixed sleeps: returns as soon as the service answers.
wait_ready() {
    local name=$1 log_file=$2 description=$3
    shift 3
    local deadline=$(($(now_s) + READY_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        if [[ -z $(service_pid "$name") ]]; then
            fail "$name" "process exited before it was ready ($description)" "$log_file"
        fi
        if (($(now_s) >= deadline)); then
            fail "$name" "not ready after ${READY_TIMEOUT_S}s ($description)" "$log_file"
        fi
        sleep 0.2
    done
}

ensure_port_free() {
    local name=$1 port=$2
    if port_open "$port"; then
        fail "$name" "port 127.0.0.1:$port is already in use by another process; stop it or set the port variable (see deploy/dev/README.md)"
    fi
}

# Starts a command detached in its own session, stdout/stderr to a log file, pid to the pid file.
spawn() {
    local name=$1 log_file=$2
    shift 2
    setsid nohup "$@" >>"$log_file" 2>&1 </dev/null &
    echo $! >"$(pid_file "$name")"
}

# ---------------------------------------------------------------------------------------------
# Installation (idempotent; quick when everything is present)

missing_debian_packages() {
    local wanted=() package
    command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || wanted+=(mosquitto)
    command -v mosquitto_sub >/dev/null || wanted+=(mosquitto-clients)
    command -v clickhouse-server >/dev/null || wanted+=(clickhouse-server)
    command -v clickhouse-client >/dev/null || wanted+=(clickhouse-client)
    command -v curl >/dev/null || wanted+=(curl)
    command -v mvn >/dev/null || wanted+=(maven)
    if ! command -v javac >/dev/null || ! java_is_17_or_newer; then wanted+=(openjdk-17-jdk-headless); fi
    # What the workspace needs to compile (rdkafka's bundled librdkafka), in the same apt call.
    mapfile -t -O "${#wanted[@]}" wanted < <("$SCRIPT_DIR/build-deps.sh" --missing)
    for package in "${wanted[@]}"; do echo "$package"; done
}

java_is_17_or_newer() {
    local major
    major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
    [[ -n $major ]] && ((major >= 17))
}

install_debian_packages() {
    local packages
    mapfile -t packages < <(missing_debian_packages)
    ((${#packages[@]} == 0)) && return 0
    local started sudo_cmd=()
    started=$(now_s)
    [[ $(id -u) == 0 ]] || sudo_cmd=(sudo)
    say "installing Debian packages: ${packages[*]}"
    # The packages' maintainer scripts would start system services on the default ports; we run
    # our own instances instead, so forbid service starts during the install.
    local created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo_cmd[@]}" chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local status=0
    {
        "${sudo_cmd[@]}" apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
    } >"$STATE_DIR/apt.log" 2>&1 || status=$?
    ((created_policy)) && "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
    ((status == 0)) || fail apt "apt-get install ${packages[*]} failed (exit $status)" "$STATE_DIR/apt.log"
    say "installed ${packages[*]} in $(($(now_s) - started))s"
}

# Resolves the broker jars from Maven Central once into a cache outside the repo.
install_kafka_jars() {
    if [[ -f $KAFKA_JARS_DIR/.complete ]]; then return 0; fi
    local started work
    started=$(now_s)
    say "downloading Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_JARS_DIR"
    mkdir -p "$CACHE_DIR"
    work=$(mktemp -d "$CACHE_DIR/kafka-pom.XXXXXX")
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tributary</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.x; the broker distribution ships this binding to log4j2. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>2.25.5</version>
    </dependency>
  </dependencies>
</project>
EOF
    rm -rf "$KAFKA_JARS_DIR.partial"
    if ! (cd "$work" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$KAFKA_JARS_DIR.partial") >"$work/mvn.log" 2>&1; then
        mkdir -p "$STATE_DIR" && cp "$work/mvn.log" "$STATE_DIR/mvn.log"
        rm -rf "$work"
        fail kafka "mvn could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION" "$STATE_DIR/mvn.log"
    fi
    rm -rf "$work" "$KAFKA_JARS_DIR"
    mv "$KAFKA_JARS_DIR.partial" "$KAFKA_JARS_DIR"
    touch "$KAFKA_JARS_DIR/.complete"
    say "Kafka $KAFKA_VERSION jars ($(find "$KAFKA_JARS_DIR" -name '*.jar' | wc -l) files) cached in $(($(now_s) - started))s"
}

# Finds (or installs) a Python that can `import chdb`; prints its path.
chdb_python() {
    local candidate
    for candidate in "${TRIBUTARY_CHDB_PYTHON:-}" "$CACHE_DIR/chdb-venv/bin/python3" "$(command -v python3 || true)"; do
        [[ -n $candidate && -x $candidate ]] || continue
        # find_spec does not load chdb's 180 MB engine library, so this check stays fast.
        if "$candidate" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("chdb") is None)' >/dev/null 2>&1; then
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

install_chdb() {
    if chdb_python >/dev/null; then return 0; fi
    local started python
    started=$(now_s)
    python=$(command -v python3 || true)
    [[ -n $python ]] || fail chdb "python3 is not installed (apt-get install python3 python3-venv)"
    say "installing chdb (pip)"
    # A system Python refuses user packages (PEP 668); a venv in the cache works everywhere.
    if ! "$python" -m pip install --quiet --disable-pip-version-check chdb >"$STATE_DIR/pip.log" 2>&1; then
        "$python" -m venv "$CACHE_DIR/chdb-venv" >>"$STATE_DIR/pip.log" 2>&1 ||
            fail chdb "could not create a venv (apt-get install python3-venv)" "$STATE_DIR/pip.log"
        "$CACHE_DIR/chdb-venv/bin/python3" -m pip install --quiet --disable-pip-version-check chdb \
            >>"$STATE_DIR/pip.log" 2>&1 || fail chdb "pip install chdb failed" "$STATE_DIR/pip.log"
    fi
    chdb_python >/dev/null || fail chdb "chdb installed but 'import chdb' still fails" "$STATE_DIR/pip.log"
    say "installed chdb in $(($(now_s) - started))s"
}

# ---------------------------------------------------------------------------------------------
# Mosquitto

mosquitto_binary() { command -v mosquitto || echo /usr/sbin/mosquitto; }

mosquitto_answers() {
    mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t '$SYS/broker/version' -C 1 -W 3 2>/dev/null
}

spawn_mosquitto() {
    local dir=$STATE_DIR/mosquitto
    mkdir -p "$dir/data"
    cat >"$dir/mosquitto.conf" <<EOF
# Written by deploy/dev/services.sh; edits are overwritten on start.
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
user $(id -un)
# Tests publish bursts at QoS 1; the default of 20 in-flight messages per client throttles them.
max_inflight_messages 0
max_queued_messages 100000
persistence true
persistence_location $dir/data/
autosave_interval 5
log_dest file $dir/mosquitto.log
log_type error
log_type warning
log_type notice
connection_messages false
EOF
    spawn mosquitto "$dir/mosquitto.out" "$(mosquitto_binary)" -c "$dir/mosquitto.conf"
}

await_mosquitto() {
    local dir=$STATE_DIR/mosquitto
    wait_ready mosquitto "$dir/mosquitto.log" "MQTT subscribe on 127.0.0.1:$MQTT_PORT" mosquitto_answers
}

mosquitto_version() { mosquitto_answers | sed 's/^mosquitto version //'; }

# ---------------------------------------------------------------------------------------------
# ClickHouse server

clickhouse_query() {
    curl -fsS --max-time 5 "http://127.0.0.1:$CLICKHOUSE_HTTP_PORT/" --data-binary "$1"
}

spawn_clickhouse() {
    local dir=$STATE_DIR/clickhouse
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Written by deploy/dev/services.sh; edits are overwritten on start. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CLICKHOUSE_HTTP_PORT</http_port>
    <tcp_port>$CLICKHOUSE_TCP_PORT</tcp_port>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
EOF
    cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Written by deploy/dev/services.sh: one password-less user, loopback only. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
    spawn clickhouse "$dir/log/stdout.log" "$(command -v clickhouse-server)" --config-file="$dir/config.xml"
}

await_clickhouse() {
    local dir=$STATE_DIR/clickhouse
    wait_ready clickhouse "$dir/log/clickhouse-server.log" \
        "HTTP SELECT 1 on 127.0.0.1:$CLICKHOUSE_HTTP_PORT" clickhouse_query 'SELECT 1'
}

clickhouse_version() { clickhouse_query 'SELECT version()'; }

# ---------------------------------------------------------------------------------------------
# Kafka (KRaft, single node: broker and controller in one JVM)

kafka_java() {
    java $KAFKA_HEAP -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$STATE_DIR/kafka/log4j2.properties" \
        -Dkafka.logs.dir="$STATE_DIR/kafka/logs" \
        -cp "$KAFKA_JARS_DIR/*" "$@"
}

# The admin helper is compiled once per source version into the cache (so a fresh state dir does
# not pay for javac again); spawn_kafka compiles it while the broker boots.
kafka_admin_classes() {
    echo "$CACHE_DIR/kafka-admin/$(sha256sum "$SCRIPT_DIR/KafkaAdmin.java" | cut -c1-16)-$KAFKA_VERSION"
}

compile_kafka_admin() {
    local classes
    classes=$(kafka_admin_classes)
    [[ -f $classes/KafkaAdmin.class ]] && return 0
    mkdir -p "$classes.partial"
    javac -nowarn -J-XX:TieredStopAtLevel=1 -cp "$KAFKA_JARS_DIR/*" -d "$classes.partial" "$SCRIPT_DIR/KafkaAdmin.java" ||
        fail kafka "could not compile $SCRIPT_DIR/KafkaAdmin.java against $KAFKA_JARS_DIR"
    rm -rf "$classes"
    mv "$classes.partial" "$classes"
}

kafka_admin() {
    compile_kafka_admin
    # Short-lived JVM: C1 only and a small heap start faster.
    java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$STATE_DIR/kafka/log4j2-tools.properties" \
        -cp "$(kafka_admin_classes):$KAFKA_JARS_DIR/*" KafkaAdmin "127.0.0.1:$KAFKA_PORT" "$@"
}

write_kafka_config() {
    local dir=$STATE_DIR/kafka
    mkdir -p "$dir/data" "$dir/logs"
    cat >"$dir/server.properties" <<EOF
# Written by deploy/dev/services.sh; edits are overwritten on start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
EOF
    cat >"$dir/log4j2.properties" <<EOF
# Broker log in the state dir, rolled so a long test session cannot fill the disk.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $dir/logs/server.log
appender.file.filePattern = $dir/logs/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
EOF
    cat >"$dir/log4j2-tools.properties" <<'EOF'
status = error
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %p %m%n
rootLogger.level = ERROR
rootLogger.appenderRef.console.ref = console
EOF
}

spawn_kafka() {
    local dir=$STATE_DIR/kafka
    write_kafka_config
    # Format once; later starts reuse the data (and the topics' contents survive stop/start).
    if [[ ! -f $dir/data/meta.properties ]]; then
        local cluster_id
        # A KRaft cluster id is 16 random bytes in URL-safe base64. One that starts with `-`
        # (1 in 64) reads as an option to kafka-storage's argument parser: draw again.
        cluster_id=-
        while [[ $cluster_id == -* ]]; do
            cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
        done
        if ! kafka_java -XX:TieredStopAtLevel=1 kafka.tools.StorageTool format --standalone --cluster-id "$cluster_id" \
            --config "$dir/server.properties" >"$dir/logs/format.log" 2>&1; then
            fail kafka "formatting KRaft storage in $dir/data failed" "$dir/logs/format.log"
        fi
    fi
    spawn kafka "$dir/logs/stdout.log" java $KAFKA_HEAP -XX:+UseG1GC -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir/logs" \
        -cp "$KAFKA_JARS_DIR/*" kafka.Kafka "$dir/server.properties"
    compile_kafka_admin
}

await_kafka() {
    local dir=$STATE_DIR/kafka topics
    wait_ready kafka "$dir/logs/server.log" "TCP connect to 127.0.0.1:$KAFKA_PORT" port_open "$KAFKA_PORT"
    read -r -a topics <<<"${KAFKA_TOPICS//,/ }"
    if ! kafka_admin "$READY_TIMEOUT_S" ready "${topics[@]}" >"$dir/logs/admin.log" 2>&1; then
        cat "$dir/logs/admin.log" >&2
        fail kafka "broker did not serve metadata or topic creation failed" "$dir/logs/server.log"
    fi
    sed 's/^/services:   kafka: /' "$dir/logs/admin.log"
}

# ---------------------------------------------------------------------------------------------
# Commands

service_port() {
    case $1 in
        mosquitto) echo "$MQTT_PORT" ;;
        clickhouse) echo "$CLICKHOUSE_HTTP_PORT" ;;
        kafka) echo "$KAFKA_PORT" ;;
    esac
}

service_version() {
    case $1 in
        mosquitto) mosquitto_version ;;
        clickhouse) clickhouse_version ;;
        kafka) echo "$KAFKA_VERSION" ;;
    esac
}

write_ports_file() {
    cat >"$STATE_DIR/ports" <<EOF
# Written by services.sh up: the ports of these services, reused by start NAME.
RECORDED_MQTT_PORT=$MQTT_PORT
RECORDED_CLICKHOUSE_HTTP_PORT=$CLICKHOUSE_HTTP_PORT
RECORDED_CLICKHOUSE_TCP_PORT=$CLICKHOUSE_TCP_PORT
RECORDED_KAFKA_PORT=$KAFKA_PORT
RECORDED_KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT
EOF
}

write_env_file() {
    local python
    python=$(chdb_python || true)
    cat >"$STATE_DIR/env.tmp" <<EOF
# Written by deploy/dev/services.sh up; source it to reach the dev services.
export TRIBUTARY_MQTT_ADDR=127.0.0.1:$MQTT_PORT
export TRIBUTARY_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export TRIBUTARY_KAFKA_VERSION=$KAFKA_VERSION
export TRIBUTARY_CLICKHOUSE_URL=http://127.0.0.1:$CLICKHOUSE_HTTP_PORT
export TRIBUTARY_CHDB_PYTHON=$python
export TRIBUTARY_SERVICES_SCRIPT=$SCRIPT_PATH
export TRIBUTARY_SERVICES_DIR=$STATE_DIR
EOF
    mv "$STATE_DIR/env.tmp" "$STATE_DIR/env"
}

# Spawns a service (if not running) without waiting; returns the start time in $SPAWNED_AT.
begin_start() {
    local name=$1
    mkdir -p "$STATE_DIR/$name"
    if [[ -n $(service_pid "$name") ]]; then
        return 1
    fi
    ensure_port_free "$name" "$(service_port "$name")"
    [[ $name != kafka ]] || ensure_port_free kafka "$KAFKA_CONTROLLER_PORT"
    "spawn_$name"
}

finish_start() {
    local name=$1 started=$2
    "await_$name"
    say "$name ready on 127.0.0.1:$(service_port "$name") ($(service_version "$name")) in $(($(now_s) - started))s"
}

start_services() {
    local name started
    declare -A spawned_at=()
    # Spawn everything first, then wait: the JVM and ClickHouse start up in parallel.
    local spawn_order=() index
    for ((index = $# ; index >= 1; index--)); do spawn_order+=("${!index}"); done
    # Spawn the slowest (kafka, last in the list) first; await in list order.
    for name in "${spawn_order[@]}"; do
        started=$(now_s)
        if begin_start "$name"; then
            spawned_at[$name]=$started
        fi
    done
    for name in "$@"; do
        if [[ -n ${spawned_at[$name]:-} ]]; then
            finish_start "$name" "${spawned_at[$name]}"
        fi
    done
    for name in "$@"; do
        [[ -z ${spawned_at[$name]:-} ]] || continue
        say "$name already running (pid $(service_pid "$name")) on 127.0.0.1:$(service_port "$name") ($(service_version "$name" 2>/dev/null || echo '?'))"
    done
}

stop_service() {
    local name=$1 pid deadline
    pid=$(service_pid "$name")
    if [[ -z $pid ]]; then
        rm -f "$(pid_file "$name")"
        say "$name not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(now_s) + STOP_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null; do
        if (($(now_s) >= deadline)); then
            say "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$(pid_file "$name")"
    say "$name stopped"
}

check_service_name() {
    case ${1:-} in
        mosquitto | clickhouse | kafka) ;;
        *) echo "services: unknown service '${1:-}': expected one of ${ALL_SERVICES[*]}" >&2; exit 2 ;;
    esac
}

status() {
    local name pid answers version any_down=0
    for name in "${ALL_SERVICES[@]}"; do
        pid=$(service_pid "$name")
        answers=no version=-
        case $name in
            mosquitto) if version=$(mosquitto_version 2>/dev/null) && [[ -n $version ]]; then answers=yes; else version=-; fi ;;
            clickhouse) if version=$(clickhouse_version 2>/dev/null); then answers=yes; else version=-; fi ;;
            kafka)
                if port_open "$KAFKA_PORT" && [[ -f $KAFKA_JARS_DIR/.complete ]] &&
                    detail=$(kafka_admin 10 describe 2>/dev/null); then
                    answers=yes version="$KAFKA_VERSION $detail"
                fi
                ;;
        esac
        printf 'services: %-10s pid=%-8s 127.0.0.1:%-6s answers=%-3s version=%s\n' \
            "$name" "${pid:--}" "$(service_port "$name")" "$answers" "$version"
        [[ $answers == yes ]] || any_down=1
    done
    local python
    if python=$(chdb_python); then
        printf 'services: %-10s python=%s version=%s\n' chdb "$python" \
            "$("$python" -c "$CHDB_VERSION_PY" 2>/dev/null || echo '?')"
    else
        printf 'services: %-10s not installed\n' chdb
        any_down=1
    fi
    return $any_down
}

main() {
    local command=${1:-}
    case $command in
        up)
            local started
            started=$(now_s)
            mkdir -p "$STATE_DIR"
            write_ports_file
            install_debian_packages
            install_kafka_jars
            install_chdb
            start_services "${ALL_SERVICES[@]}"
            write_env_file
            local python
            python=$(chdb_python)
            say "chdb $("$python" -c "$CHDB_VERSION_PY" 2>&1 || echo 'import failed') with $python"
            say "all services up in $(($(now_s) - started))s; env in $STATE_DIR/env"
            ;;
        down)
            local name
            for name in "${ALL_SERVICES[@]}"; do stop_service "$name"; done
            # Without running services the env file would point tests at dead ports.
            rm -f "$STATE_DIR/env"
            ;;
        start)
            check_service_name "${2:-}"
            mkdir -p "$STATE_DIR"
            install_debian_packages
            [[ $2 != kafka ]] || install_kafka_jars
            start_services "$2"
            [[ -f $STATE_DIR/env ]] || write_env_file
            ;;
        stop)
            check_service_name "${2:-}"
            stop_service "$2"
            ;;
        status) status ;;
        env)
            [[ -f $STATE_DIR/env ]] || { echo "services: no $STATE_DIR/env; run $SCRIPT_PATH up" >&2; exit 1; }
            cat "$STATE_DIR/env"
            ;;
        *)
            echo "usage: $0 up|down|status|env|start NAME|stop NAME   (NAME: ${ALL_SERVICES[*]})" >&2
            exit 2
            ;;
    esac
}

main "$@"
