#!/usr/bin/env bash
# Install Prometheus and promtool from Debian/Ubuntu packages when they are missing (idempotent).
# Grafana is optional: start.sh starts it when `grafana-server` or `grafana` is installed.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install.sh: no apt-get here; install Prometheus (https://prometheus.io/download/) so that" \
         "'prometheus' and 'promtool' are on PATH" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install.sh: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi
echo "installing Prometheus (Debian package 'prometheus')"
$SUDO apt-get update -qq
# --no-install-recommends: the node exporter and its service are not needed for Ray's metrics.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ -d /run/systemd/system ] && systemctl is-active --quiet prometheus 2>/dev/null; then
    echo "note: the packaged prometheus.service is running on :9090; 'sudo systemctl disable --now prometheus'" \
         "or run 'PROMETHEUS_PORT=9091 make monitoring'" >&2
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
