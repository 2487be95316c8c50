#!/usr/bin/env bash
# footprint.sh: the daemon's RSS and CPU (% of one core) under loopback churn between two namespaces it
# creates (198.19.0.0/24), the churn namespace polled with --netns; bounded by SECONDS (default 20).
# Usage: sudo tests/load/footprint.sh [SECONDS]   (needs `make setup`; EXTRA adds flags to `tcpstate run`)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
work=$(mktemp -d); a=fp-a-$$ b=fp-b-$$ port=19978
cleanup() { [[ -n ${srv:-} ]] && kill "$srv" 2>/dev/null; [[ -n ${daemon:-} ]] && kill "$daemon" 2>/dev/null; ip netns del "$a" 2>/dev/null||true; ip netns del "$b" 2>/dev/null||true; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=tests/load/churn-pair.sh
source tests/load/churn-pair.sh
# shellcheck disable=SC2086  # EXTRA is a list of flags
.venv/bin/tcpstate --log-level warning run --listen-address "127.0.0.1:$port" --netns "/var/run/netns/$a" ${EXTRA:-} > /dev/null &
daemon=$!
until curl -sf "127.0.0.1:$port/-/ready" >/dev/null; do sleep 0.2; done
sleep 2
t0=$(awk '{print $14+$15}' "/proc/$daemon/stat"); echo "ready RSS: $(grep VmRSS "/proc/$daemon/status")"
ip netns exec "$a" "$work/churn" client 198.19.0.2 5001 "$secs" 1000000000 2 &
cl=$!
while kill -0 "$cl" 2>/dev/null; do curl -s -o /dev/null "127.0.0.1:$port/metrics"; sleep 1; done
t1=$(awk '{print $14+$15}' "/proc/$daemon/stat")
echo "CPU during churn: $(awk -v a="$t0" -v b="$t1" -v s="$secs" 'BEGIN{printf "%.1f%% of one core", (b-a)/100/s*100}')"
grep -E "VmRSS|VmHWM" "/proc/$daemon/status"
curl -s "127.0.0.1:$port/metrics" | grep -E '^tcpstate_sockets\{netns="fp' | head -3
