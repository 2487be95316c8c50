#!/usr/bin/env bash
# overhead.sh: loopback-churn throughput with and without `tcpstate run` attached, alternating, in one run.
# Usage: sudo tests/load/overhead.sh [SECONDS_PER_RUN] [ROUNDS]   (needs `make setup` first)
# TCPSTATE_ARGS adds flags to `tcpstate run` (e.g. "--recent-closes 0 --max-offenders 0").
# kernel.bpf_stats_enabled is 1 during the monitored runs (restored after): each round prints every
# program's ns per run and runs per connection, and their mean over all programs.
# Traffic stays between two namespaces it creates on 198.19.0.0/24; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
rounds=${2:-3}
work=$(mktemp -d)
a=ovh-a-$$ b=ovh-b-$$ port=19977
stats_was=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
    sysctl -qw kernel.bpf_stats_enabled="$stats_was"
    [[ -n ${srv:-} ]] && kill "$srv" 2>/dev/null
    [[ -n ${daemon:-} ]] && kill "$daemon" 2>/dev/null
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# shellcheck source=tests/load/churn-pair.sh
source tests/load/churn-pair.sh

metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
churn() { ip netns exec "$a" "$work/churn" client 198.19.0.2 5001 "$secs" 1000000000 2 | sed 's/.*rate=//'; }

base=() mon=()
for ((i = 1; i <= rounds; i++)); do
    base+=("$(churn)")
    sleep 1
    sysctl -qw kernel.bpf_stats_enabled=1
    # shellcheck disable=SC2086  # TCPSTATE_ARGS is a list of flags
    .venv/bin/tcpstate --log-level warning run --listen-address "127.0.0.1:$port" --include-cidr 198.19.0.0/24 \
        ${TCPSTATE_ARGS:-} > /dev/null &
    daemon=$!
    until curl -sf "127.0.0.1:$port/-/ready" >/dev/null; do sleep 0.2; done
    before=$(metric 'tcpstate_connections_opened_total{direction="active"}')
    out=$(ip netns exec "$a" "$work/churn" client 198.19.0.2 5001 "$secs" 1000000000 2)
    sleep 2
    after=$(metric 'tcpstate_connections_opened_total{direction="active"}')
    lost=$(metric tcpstate_events_lost_total)
    programs=$(curl -s "127.0.0.1:$port/metrics" | awk -v made="${out#made=}" '
        # ns per run and runs per connection of each program: where the time goes
        /^tcpstate_probe_run_seconds_total/ { split($1, a, "\""); s[a[2]] = $2 }
        /^tcpstate_probe_runs_total/ { split($1, a, "\""); n[a[2]] = $2 }
        END { split(made, m, " "); for (tp in n) if (n[tp] > 0) { ns += s[tp]; runs += n[tp]
                  printf "  %-28s %7.0f ns/run %6.2f runs/conn\n", tp, s[tp] * 1e9 / n[tp], n[tp] / m[1] }
              if (runs > 0) printf "  %-28s %7.0f ns/run %6.2f runs/conn\n", "all programs", ns * 1e9 / runs, runs / m[1] }')
    sysctl -qw kernel.bpf_stats_enabled="$stats_was"
    kill "$daemon"; wait "$daemon" || true; daemon=
    made=${out#made=}; made=${made%% *}
    mon+=("${out##*rate=}")
    printf 'round %d: no monitor %s/s, tcpstate %s/s; made %s, counted active opens %.0f, events lost %s\n%s\n' \
        "$i" "${base[-1]}" "${mon[-1]}" "$made" "$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}')" "$lost" \
        "$programs"
    sleep 1
done
python3 - "${base[*]}" "${mon[*]}" <<'PY'
import statistics, sys
base = [float(x) for x in sys.argv[1].split()]
mon = [float(x) for x in sys.argv[2].split()]
b, m = statistics.median(base), statistics.median(mon)
print(f"median: no monitor {b:.0f}/s, tcpstate {m:.0f}/s, ratio {m / b:.3f}")
PY
