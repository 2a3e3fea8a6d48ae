#!/usr/bin/env bash
# The quick start: builds both binaries, writes sample container logs in kubelet's layout
# (demo/var/log/pods/...), starts the aggregator (embedded storage, no other server) and an
# agent tailing those logs over mutual TLS, and keeps one sample pod logging.
# Ctrl-C stops everything. Run it again to continue where it left off.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release -p logging-aggregator -p logging-agent
DEMO="$PWD/demo"
PODS="$DEMO/var/log/pods"
mkdir -p "$DEMO"

now() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }
pod_dir() { mkdir -p "$PODS/$1/$2"; echo "$PODS/$1/$2"; }

WEB=$(pod_dir "shop_web-7d4b9c5f6-x2k9p_0e7b3c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6" nginx)
CHECKOUT=$(pod_dir "shop_checkout-5f9c8d7b6c-qwz4t_5b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e" app)
WORKER=$(pod_dir "jobs_worker-0_9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d" worker)
if [ ! -f "$WEB/0.log" ]; then
  {
    echo "$(now) stdout F 10.0.0.7 - - [$(date -u '+%d/%b/%Y:%H:%M:%S +0000')] \"GET /api/items/7 HTTP/1.1\" 200 512 \"-\" \"curl/8.0\" 0.004"
    echo "$(now) stdout F 10.0.0.9 - - [$(date -u '+%d/%b/%Y:%H:%M:%S +0000')] \"POST /api/cart HTTP/1.1\" 503 0 \"-\" \"Mozilla/5.0\" 1.250"
  } >> "$WEB/0.log"
  {
    echo "$(now) stdout F {\"level\":\"info\",\"msg\":\"payment accepted\",\"order\":4711,\"duration_ms\":84,\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"}"
    echo "$(now) stderr F {\"level\":\"error\",\"msg\":\"payment failed: card declined\",\"order\":4712,\"duration_ms\":812,\"user_id\":\"alice\"}"
  } >> "$CHECKOUT/0.log"
  {
    echo "$(now) stderr F Traceback (most recent call last):"
    echo "$(now) stderr F   File \"/app/worker.py\", line 12, in <module>"
    echo "$(now) stderr F     run()"
    echo "$(now) stderr F ZeroDivisionError: division by zero"
    echo "$(now) stdout F INFO worker ready, password=hunter2"
  } >> "$WORKER/0.log"
fi

cleanup() {
  trap - EXIT INT TERM
  # The agent first (it sends what it has), then the aggregator (it commits everything).
  kill "${WRITER:-}" 2>/dev/null || true
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
  [ -n "${AGGREGATOR:-}" ] && kill "$AGGREGATOR" 2>/dev/null && wait "$AGGREGATOR" 2>/dev/null
  true
}
trap cleanup EXIT INT TERM
# Each background process in its own process group: Ctrl-C reaches this script only, and
# cleanup stops the agent first (it sends what it has), then the aggregator.
set -m

DATA_DIR="$DEMO/aggregator" LOG_FORMAT=text ./target/release/logging-aggregator &
AGGREGATOR=$!
for _ in $(seq 1 100); do
  [ -f "$DEMO/aggregator/certs/agent-key.pem" ] && curl -s -o /dev/null localhost:8000/health && break
  sleep 0.1
done

CERTS="$DEMO/aggregator/certs"
AGGREGATOR_URL=https://localhost:8443 TLS_CA="$CERTS/ca.pem" TLS_CERT="$CERTS/agent.pem" \
  TLS_KEY="$CERTS/agent-key.pem" AGENT_PATHS="$PODS/*/*/*.log" AGENT_DATA_DIR="$DEMO/agent" \
  NODE_NAME=demo-node LOG_FORMAT=text ./target/release/logging-agent &
AGENT=$!

# One pod keeps logging, once a second.
( n=0; while true; do
    n=$((n + 1))
    echo "$(now) stdout F {\"level\":\"info\",\"msg\":\"heartbeat $n\",\"duration_ms\":$((RANDOM % 300))}" >> "$CHECKOUT/0.log"
    sleep 1
  done ) &
WRITER=$!

cat <<MSG

The aggregator is on http://localhost:8000 and an agent is shipping demo/var/log/pods to it.
In another terminal:

  TOKEN=\$(cat demo/aggregator/admin-token)
  curl -s "localhost:8000/api/logs?limit=5" -H "Authorization: Bearer \$TOKEN"
  curl -s "localhost:8000/api/search?q=declined" -H "Authorization: Bearer \$TOKEN"
  curl -s "localhost:8000/api/logs?service=worker" -H "Authorization: Bearer \$TOKEN"
  curl -s "localhost:8000/api/analytics?interval=1m" -H "Authorization: Bearer \$TOKEN"

Ctrl-C stops everything.
MSG
wait
