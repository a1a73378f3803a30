#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain:
#   1. installs what is missing and starts the real services on loopback (deploy/dev/services.sh up;
#      it also installs the build dependencies of deploy/dev/build-deps.sh, which librdkafka needs),
#   2. checks formatting,
#   3. runs every test of the workspace against them (with CI=true a missing service fails),
#   4. stops the services again, also when a test fails.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

log() { printf 'test.sh: %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install a Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi

started=$(date +%s)
bash deploy/dev/services.sh up
bash deploy/dev/browser-deps.sh   # Debian chromium for the dashboard browser test
trap 'bash deploy/dev/services.sh down || true' EXIT
# shellcheck disable=SC1091
source "${TRIBUTARY_SERVICES_DIR:-$repo/.services}/env"
log "services up in $(($(date +%s) - started))s"

cargo fmt --all -- --check

# cargo-deb and PyYAML for the packaging and deployment tests; then the agent's release build
# and .deb once here, so its cost shows in the log (the test rebuilds nothing after this).
bash deploy/dev/packaging-deps.sh
log "agent release build and Debian package"
package_started=$(date +%s)
cargo deb -p tributary-agent --locked --strip
log "agent package built in $(($(date +%s) - package_started))s"

log "building the workspace and its tests"
cargo test --workspace --locked --no-run
# The end-to-end tests run the real binaries next to the test executables.
cargo build --workspace --locked --bins

# The service smoke tests first and uncaptured, so the log shows each service being used.
log "service smoke tests"
cargo test -p tributary-tests --locked --test 'services_*' -- --nocapture

log "whole workspace"
cargo test --workspace --locked --no-fail-fast
log "all tests passed in $(($(date +%s) - started))s"
