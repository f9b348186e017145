#!/usr/bin/env bash
# Property-based API test: a live `otad serve`, its own OpenAPI document, a bounded number of
# generated requests; fails on any 5xx or any reply that breaks the envelope (ci/schemathesis_hooks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OTAD=.venv/bin/otad
data_dir=$(mktemp -d)
port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
healthz() { .venv/bin/python -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$http_port/healthz"; }
http_port=$(port); mqtt_port=$(port)
token=$("$OTAD" token create schemathesis --data-dir "$data_dir" 2>/dev/null | tail -1)
"$OTAD" serve --data-dir "$data_dir" --http-host 127.0.0.1 --http-port "$http_port" --mqtt-host 127.0.0.1 \
    --mqtt-port "$mqtt_port" --log-level warning > "$data_dir/otad.log" 2>&1 &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    healthz > /dev/null 2>&1 && break
    sleep 0.1
done
SCHEMATHESIS_HOOKS=ci.schemathesis_hooks .venv/bin/schemathesis run \
    "http://127.0.0.1:$http_port/api/v2/openapi.json" -H "Authorization: Bearer $token" \
    --checks not_a_server_error,otad_envelope --phases examples,fuzzing --max-examples 20 \
    --seed 20261126 --no-color
# The daemon must still be serving afterwards.
healthz
