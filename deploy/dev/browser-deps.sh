#!/usr/bin/env bash
# Installs what the dashboard's browser test needs: Debian's chromium (the test drives it over the
# Chrome DevTools Protocol from Rust, so no Node, chromedriver or browser download is needed).
#
# Why Debian's package: CI machines and dev boxes reach Debian's archive but no browser download
# site; the test finds the browser at /usr/bin/chromium (or $TRIBUTARY_CHROMIUM).
# Idempotent: does nothing when chromium is already installed. Needs root for apt-get.
set -euo pipefail

say() { echo "browser-deps: $*"; }

if command -v "${TRIBUTARY_CHROMIUM:-chromium}" >/dev/null 2>&1; then
    say "chromium present: $("${TRIBUTARY_CHROMIUM:-chromium}" --version 2>/dev/null || echo unknown version)"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "browser-deps: chromium is missing and installing it needs root: sudo apt-get install chromium" >&2
    exit 1
fi
say "installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
say "chromium installed: $(chromium --version 2>/dev/null || echo unknown version)"
