#!/usr/bin/env bash
# Installs what the packaging and deployment tests need (idempotent; about 0.1 s when present):
#   - cargo-deb at a pinned version, from crates.io (`cargo install --locked`; about 4 minutes
#     of compiling on 2 cores the first time, then skipped while that version is installed),
#   - PyYAML for python3 (Debian python3-yaml), which the tests use to parse the compose file
#     and the Kubernetes manifests.
#
# Usage: packaging-deps.sh   (deploy/dev/test.sh calls it)
set -euo pipefail

CARGO_DEB_VERSION=${TRIBUTARY_CARGO_DEB_VERSION:-3.8.0}

say() { echo "packaging-deps: $*"; }

installed=$(cargo deb --version 2>/dev/null || true)
if [[ $installed != *"$CARGO_DEB_VERSION"* ]]; then
    started=$(date +%s)
    say "installing cargo-deb $CARGO_DEB_VERSION (found: ${installed:-none})"
    # A private target dir: the workspace's CARGO_TARGET_DIR must not fill with cargo-deb's build.
    scratch=$(mktemp -d)
    if ! CARGO_TARGET_DIR=$scratch cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" \
        >"$scratch.log" 2>&1; then
        echo "packaging-deps: ERROR: cargo install cargo-deb $CARGO_DEB_VERSION failed; last lines:" >&2
        tail -n 30 "$scratch.log" >&2
        rm -rf "$scratch" "$scratch.log"
        exit 1
    fi
    rm -rf "$scratch" "$scratch.log"
    say "installed cargo-deb $CARGO_DEB_VERSION in $(($(date +%s) - started))s"
fi

if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    sudo_cmd=()
    [[ $(id -u) == 0 ]] || sudo_cmd=(sudo)
    say "installing python3-yaml"
    { "${sudo_cmd[@]}" apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-yaml; } >/dev/null ||
        { echo "packaging-deps: ERROR: apt-get install python3-yaml failed" >&2; exit 1; }
    python3 -c 'import yaml' 2>/dev/null ||
        say "warning: python3 ($(command -v python3)) still cannot import yaml; the tests look for /usr/bin/python3 too"
fi
