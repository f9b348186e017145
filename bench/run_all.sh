#!/usr/bin/env bash
# Regenerates the figures in BENCHMARKS.md: every benchmark, three rounds each, medians and ratios.
# Needs Debian's mosquitto, nginx-light, wrk and curl (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
for tool in mosquitto nginx wrk curl; do command -v "$tool" > /dev/null || missing="$missing $tool"; done
if [ -n "$missing" ]; then
    apt-get update -q && apt-get install -y -q mosquitto nginx-light wrk curl
fi
PY=.venv/bin/python
$PY bench/broker_fanout.py --devices 10000 --rounds 3
$PY bench/http_bench.py downloads polls upload --seconds 10 --rounds 3
