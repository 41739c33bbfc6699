#!/usr/bin/env bash
# Reload afpa 100 times while wrk loads it; report failed requests (non-2xx/3xx
# answers and socket errors).  0 of each is the expectation.
#
#   bench/reload_under_load.sh [RELOADS] [CONNECTIONS]
#   WORKERS=2 bench/reload_under_load.sh      # the same through a supervisor and 2 workers
#
# afpa serves a docroot (1 KiB file: cache hits) and a route /api/ to an nginx
# origin (every request has its own query string: a miss forwarded through the
# backend pool).  Two wrk runs go at once: keep-alive connections, and a new
# connection per request (`Connection: close`).  Meanwhile the config file is
# rewritten and `POST /reload` sent RELOADS times (every reload changes a setting
# and the route set; every tenth also the client table, which makes a new
# machine).  wrk is stopped with SIGINT after the last reload and its summary
# parsed.  Needs wrk, nginx, curl.
set -euo pipefail
reloads=${1:-100}; conns=${2:-40}; workers=${WORKERS:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

mkdir -p "$work/docs/api"
head -c 1024 /dev/urandom > "$work/docs/1k.bin"
cp "$work/docs/1k.bin" "$work/docs/api/1k.bin"
chmod -R a+rX "$work/docs"

oport=$(free_port); port=$(free_port); aport=$(free_port)
cat > "$work/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000;
       server { listen 127.0.0.1:$oport; root $work/docs; } }
EOF
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)
wait_port "$oport"

openssl rand -hex 32 > "$work/token"
(cd "$here" && python3 -m afpa tables show http > "$work/http.toml")
cp "$work/http.toml" "$work/http.toml.orig"
config() {  # config N: every reload differs from the one before
  local extra=""
  if [ $(( $1 % 2 )) -eq 0 ]; then extra=$'\n[[route]]\nprefix = "/b/"\nto = "remote"\nbackend = "http://127.0.0.1:'"$oport"$'"\n'; fi
  cat > "$work/afpa.toml" <<EOF
listen = "127.0.0.1:$port"
admin = "127.0.0.1:$aport"
admin_token_file = "$work/token"
workers = $workers
root = "$work/docs"
table = "$work/http.toml"

[cache]
grace = $(( $1 % 3 ))

[[route]]
prefix = "/api/"
to = "remote"
backend = "http://127.0.0.1:$oport"
$extra
EOF
}
config 0
(cd "$here" && exec python3 -m afpa serve --config "$work/afpa.toml" --quiet 2> "$work/afpa.err") &
afpa_pid=$!
pids+=($afpa_pid)
wait_port "$port"

cat > "$work/mix.lua" <<'EOF'
local n = 0
request = function()
  n = n + 1
  if n % 2 == 0 then return wrk.format("GET", "/1k.bin") end
  return wrk.format("GET", "/api/1k.bin?n=" .. n .. "-" .. math.random(1000000))
end
EOF
wrk -t1 -c"$conns" -d300s --timeout 10s -s "$work/mix.lua" "http://127.0.0.1:$port/" > "$work/wrk-keepalive.txt" &
wk=$!; pids+=($wk)
wrk -t1 -c10 -d300s --timeout 10s -s "$work/mix.lua" -H "Connection: close" "http://127.0.0.1:$port/" > "$work/wrk-close.txt" &
wc_=$!; pids+=($wc_)
sleep 1

failed_reloads=0
start=$(date +%s.%N)
for i in $(seq 1 "$reloads"); do
  if [ $(( i % 10 )) -eq 0 ]; then { cat "$work/http.toml.orig"; echo "# reload $i"; } > "$work/http.toml"; fi
  config "$i"
  code=$(curl -s -o "$work/reload.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $(cat "$work/token")" \
         "http://127.0.0.1:$aport/reload")
  [ "$code" = 200 ] || { failed_reloads=$((failed_reloads + 1)); cat "$work/reload.json" >&2; }
done
elapsed=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
sleep 1
kill -INT "$wk" "$wc_"
wait "$wk" "$wc_" || true

summary() {  # summary FILE LABEL
  local req non2xx sock
  req=$(awk '/requests in/ {print $1}' "$1")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$1"); non2xx=${non2xx:-0}
  sock=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' "$1"); sock=${sock:-0}
  echo "$2: requests=${req:-?} non-2xx/3xx=$non2xx socket-errors=$sock"
  [ "$non2xx" = 0 ] && [ "$sock" = 0 ]
}
echo "afpa: $reloads reloads in ${elapsed}s under load (failed reloads: $failed_reloads)"
ok=0
summary "$work/wrk-keepalive.txt" "wrk keep-alive -c$conns" || ok=1
summary "$work/wrk-close.txt" "wrk Connection: close -c10" || ok=1
[ "$failed_reloads" = 0 ] || ok=1
if [ "$ok" != 0 ]; then echo "--- afpa stderr:"; tail -20 "$work/afpa.err"; cat "$work"/wrk-*.txt; fi
exit "$ok"
