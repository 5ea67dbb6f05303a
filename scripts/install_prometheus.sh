#!/usr/bin/env bash
# Install Prometheus (and promtool) from Debian's `prometheus` package, for the service's scrape test
# (tests/server/test_prometheus.py) and `promtool check metrics`. Idempotent: does nothing when `prometheus` is
# already on PATH. Needs root or sudo. The tests start their own Prometheus on a free port.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1; then
  echo "prometheus already installed: $(command -v prometheus)"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "error: installing prometheus needs root (or sudo): apt-get install -y prometheus" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# On a host with systemd the package also enables its own daemon on :9090; the tests do not need it
# (`systemctl disable --now prometheus` stops it). Containers without an init system start nothing.
$SUDO apt-get install -y -qq --no-install-recommends prometheus
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "installed $(prometheus --version 2>&1 | head -1)"
