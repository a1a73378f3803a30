#!/usr/bin/env bash
# The demo: simulated sensors -> agent -> collector -> dashboard, on embedded defaults, loopback only,
# no external services. Ctrl-C stops everything.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1; then
    echo "demo.sh: cargo not found; install a Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi
exec cargo run --quiet --release -p tributary-firmware-sim --bin tributary-sim -- demo "$@"
