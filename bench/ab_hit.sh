#!/usr/bin/env bash
# Compare the 1 KiB cache-hit path of two afpa checkouts in one run, interleaved.
#
#   bench/ab_hit.sh OLD_TREE NEW_TREE [ROUNDS] [SECONDS] [root|backend]
#   e.g. git worktree add /tmp/afpa-old <rev> && bench/ab_hit.sh /tmp/afpa-old .
#
# "backend" measures hits of a stored backend response instead: a small origin
# (Python's http.server with Cache-Control: max-age=3600) serves the file once
# and afpa runs with --backend.
#
# Each round starts one server at a time pinned to CPU 0 (`afpa serve --root` over a
# 1 KiB file), warms it (the first GET is the miss), runs wrk on CPU 1 with 50
# keep-alive connections, and prints requests and server CPU per request
# (utime+stime of the server from /proc/PID/stat, after minus before, / requests).
# Interleaving old and new in every round keeps a busy shared host from favouring
# either; compare the CPU column, not req/s alone.  Needs wrk, taskset, curl.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); rounds=${3:-3}; secs=${4:-5}; mode=${5:-root}
docs=$(mktemp -d)
head -c 1024 /dev/urandom > "$docs/1k.bin"
tick=$(getconf CLK_TCK)
origin_pid=""
trap 'rm -rf "$docs"; [ -n "$origin_pid" ] && kill "$origin_pid" 2>/dev/null' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve_args=(--root "$docs")
if [ "$mode" = backend ]; then
  oport=$(free_port)
  (cd "$docs" && exec taskset -c 1 python3 -c '
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Cache-Control", "max-age=3600")
        super().end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$oport") &
  origin_pid=$!
  serve_args=(--backend "http://127.0.0.1:$oport")
fi

run() {  # label tree
  local port pid t0 t1 n
  port=$(free_port)
  (cd "$2" && exec taskset -c 0 env PYTHONPATH="$2" python3 -m afpa serve "${serve_args[@]}" \
      --listen "127.0.0.1:$port" --quiet) 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/1k.bin" && break; sleep 0.1; done
  curl -s -o /dev/null "http://127.0.0.1:$port/1k.bin"
  t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  n=$(taskset -c 1 wrk -t1 -c50 -d"${secs}s" "http://127.0.0.1:$port/1k.bin" | awk '/requests in/{print $1}')
  t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v l="$1" -v n="$n" -v d=$((t1 - t0)) -v hz="$tick" -v s="$secs" \
      'BEGIN { printf "| %s | %d | %.0f | %.1f |\n", l, n, n / s, d / hz / n * 1e6 }'
}

echo "1 KiB hits ($mode), wrk -c50 keep-alive ${secs}s, server on CPU 0, wrk on CPU 1"
echo "| tree | requests | req/s | µs CPU/req |"
echo "|------|---------:|------:|-----------:|"
for _ in $(seq "$rounds"); do run old "$old"; run new "$new"; done
