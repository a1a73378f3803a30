#!/usr/bin/env bash
# The demo: simulated sensors -> agent -> collector -> dashboard, on embedded defaults, loopback only,
# no external services. Ctrl-C stops everything. Extra arguments go to `tributary-sim demo`
# (e.g. --devices 50 --rate 2 --http-port 8081 --duration 60).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1; then
    echo "demo.sh: cargo not found; install a Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi
# The collector links librdkafka (built from source by cmake, with the libcurl headers).
if [[ -n "$(bash "$repo/deploy/dev/build-deps.sh" --missing)" ]]; then
    bash "$repo/deploy/dev/build-deps.sh"
fi
echo "demo.sh: building the agent, the collector and the simulator (release; the first build takes a few minutes)" >&2
cargo build --quiet --release --locked -p tributary-agent -p tributary-collector -p tributary-firmware-sim --bins
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
export TRIBUTARY_BIN_DIR="$target_dir/release"
exec "$TRIBUTARY_BIN_DIR/tributary-sim" demo "$@"
