#!/usr/bin/env bash
# Installs the Debian packages needed to compile the workspace (idempotent, quick when present).
#
# Why: rdkafka builds its bundled librdkafka (2.12.1) with cmake. Even with curl disabled, that
# librdkafka's CMake build includes <curl/curl.h> (upstream bug confluentinc/librdkafka#5135:
# `#ifdef WITH_OAUTHBEARER_OIDC` on a macro defined as 0), so the libcurl headers must be present.
# Nothing links against libcurl. zlib headers let libz-sys use the system zlib instead of
# compiling its own.
#
# Usage: build-deps.sh            install what is missing
#        build-deps.sh --missing  only print the missing packages (services.sh folds them into
#                                 its single apt-get install)
set -euo pipefail

PACKAGES=(cmake make gcc g++ pkg-config libcurl4-openssl-dev zlib1g-dev)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$package")
    fi
done
if [[ ${1:-} == --missing ]]; then
    for package in "${missing[@]}"; do echo "$package"; done
    exit 0
fi
if ((${#missing[@]} == 0)); then
    exit 0
fi

sudo_cmd=()
[[ $(id -u) == 0 ]] || sudo_cmd=(sudo)
started=$(date +%s)
echo "build-deps: installing ${missing[*]}"
log=$(mktemp)
if ! { "${sudo_cmd[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "build-deps: ERROR: apt-get install ${missing[*]} failed; last lines of the log:" >&2
    tail -n 40 "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
echo "build-deps: installed ${missing[*]} in $(($(date +%s) - started))s"
