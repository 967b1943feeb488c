#!/usr/bin/env bash
# The README's main job: start `sparseinfer serve` (the bundled ReLU² model, predicted sparsity), wait until
# its health check says SERVING, send one real request with the client CLI (streamed text, then the request's
# sparsity report as JSON), and stop the server with SIGTERM so it drains. Usage: scripts/demo.sh [VENV_BIN]
set -euo pipefail
bin=${1:-.venv/bin}
port=${SPARSEINFER_DEMO_PORT:-50051}
target="127.0.0.1:$port"
log=$(mktemp -t sparseinfer-demo.XXXXXX.log)

"$bin/sparseinfer" serve --port "$port" --sparsity predicted >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

for _ in $(seq 1 120); do
  if "$bin/sparseinfer-client" --target "$target" --timeout 2 health >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "demo: the server exited before it was ready; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
"$bin/sparseinfer-client" --target "$target" --timeout 5 health

echo "--- streamed completion:"
"$bin/sparseinfer-client" --target "$target" --timeout 60 generate --stream --max-new-tokens 48 --seed 1 \
  "And it came to pass"
echo
echo "--- the same request, with its sparsity report:"
"$bin/sparseinfer-client" --target "$target" --timeout 60 generate --json --max-new-tokens 48 --seed 1 \
  "And it came to pass"
