#!/bin/bash
# guest.sh: make test-fresh's steps inside the fresh machine (as root at boot): a new user's commands, each timed.
#
# The host puts this file on the second disk as /mnt/io/run, with the checkout as tcpstate.bundle
# and its settings in /mnt/io/env. Each step's output goes to /mnt/io/out/STEP.log, one line per
# step to /mnt/io/out/steps (name, exit status, seconds) and to the console, which the host
# follows. The first failed step ends the run: the ones after it depend on it.
# shellcheck disable=SC2317  # the step functions are reached through step()
set -u
io=/mnt/io
out=$io/out
mkdir -p "$out"
user=newuser
clone=/home/$user/tcpstate
url=http://127.0.0.1:9966
# shellcheck source=/dev/null  # written by run.py: TESTS (what make test runs here), N
. "$io/env"

note() { echo "fresh: $*" >/dev/console; echo "$*" >>"$out/guest.log"; }
fact() { echo "$*" >>"$out/facts"; }
as_user() { runuser -l "$user" -c "$1"; }
packages() { dpkg-query -W -f='${db:Status-Abbrev}\n' | grep -c '^ii'; }
disk_mb() { df --output=used -B1M / | tail -n 1 | tr -d ' '; }
# Enabled units (their links) and running services (a non-empty cgroup), read from the file
# systems rather than asked of systemd: under emulation PID 1 answered after systemctl's 25 s
# timeout ("Failed to list unit files: Connection timed out") and the list came back empty.
units() {
    find /etc/systemd/system -mindepth 2 -maxdepth 2 -type l \( -path '*.wants/*' -o -path '*.requires/*' \) -printf '%f\n' | sort -u
    local cg
    for cg in /sys/fs/cgroup/system.slice/*.service; do
        [[ -n $(cat "$cg/cgroup.procs" 2>/dev/null) ]] && echo "running ${cg##*/}"
    done
}

# Microseconds since the epoch (no bc on a fresh machine), and seconds since one with a decimal.
now_us() { echo "${EPOCHREALTIME/./}"; }
since() { local us=$(($(now_us) - $1)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }

# Setup's step lines and pytest's summary go to the console too: the host shows them as they come.
progress() {
    grep --line-buffered -E '^(setup|setup-host|install): |^=+ .*(passed|failed|error)' | sed -u 's/^/fresh:   /' >/dev/console
}

# Each step runs in this shell, not in a pipeline's subshell: make-run's background job must
# stay a child that the sigterm step can wait for. A follower copies its log to the console.
step() {
    local name=$1 start status took follower
    shift
    note "step $name: started"
    : >"$out/$name.log"
    tail -s 0.2 -n +1 -f "$out/$name.log" 2>/dev/null > >(progress) &
    follower=$!
    start=$(now_us)
    "$@" >>"$out/$name.log" 2>&1
    status=$?
    took=$(since "$start")
    sleep 0.5
    kill "$follower"
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >>"$out/steps"
    if ((status)); then
        note "step $name: FAILED (exit $status) after $took s"
        finish 1
    fi
    note "step $name: ok in $took s"
}

finish() {
    # What went wrong is often only in the journal (a unit that failed to start says so there).
    ((${1})) && journalctl -b --no-pager -o short-monotonic >"$out/journal.txt" 2>&1
    echo "$1" >"$out/status"
    sync
    exit "$1"
}

facts() {
    fact "kernel $(uname -r)"
    fact "systemd_version $(systemctl --version | head -n 1)"
    fact "packages_fresh $(packages)"
    fact "disk_mb_fresh $(disk_mb)"
    fact "boot_seconds $(awk '{print $1}' /proc/uptime)"
    # apt's timers would start an apt of their own mid-run: its connections to the archive would
    # land in the exact counts below (setup itself waits for apt's lock, as on any host).
    systemctl stop apt-daily.timer apt-daily-upgrade.timer
    units | sort >"$out/units-fresh"
    cat "$out/facts"
}

clone() {
    cp "$io/tcpstate.bundle" /tmp/tcpstate.bundle
    chmod 0644 /tmp/tcpstate.bundle
    as_user "git clone /tmp/tcpstate.bundle tcpstate && git -C tcpstate log -1 --oneline"
}

# sudo make run, as the user types it, until /-/ready says 200.
make_run() {
    as_user "cd tcpstate && exec sudo make run" >"$out/make-run.daemon.log" 2>&1 </dev/null &
    echo $! >/tmp/make-run.pid
    # Not a pipe into the step's log: the daemon outlives this step, and so would the pipe.
    (tail -s 0.2 -n +1 -f --pid="$!" "$out/make-run.daemon.log" | progress) >/dev/null 2>&1 &
    local start=$SECONDS code
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$url/-/ready")
        [[ $code == 200 ]] && break
        if ! kill -0 "$(cat /tmp/make-run.pid)" 2>/dev/null; then
            echo "sudo make run exited before /-/ready answered 200"
            tail -n 40 "$out/make-run.daemon.log"
            return 1
        fi
        if ((SECONDS - start > 3000)); then
            echo "no 200 from /-/ready within 3000 s"
            return 1
        fi
        sleep 1
    done
    fact "make_run_ready_seconds $((SECONDS - start))"
    grep '^setup: done in' "$out/make-run.daemon.log" | sed 's/^setup: done in \([0-9]*\) s/make_run_setup_seconds \1/' >>"$out/facts"
}

# SIGTERM to the daemon (found by its listening socket): it exits 0 within 2 s, and so does make.
sigterm() {
    local pid start status took
    pid=$(ss -Htlnp 'sport = :9966' | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
    [[ -n $pid ]] || { echo "nothing listens on :9966"; return 1; }
    tr '\0' ' ' <"/proc/$pid/cmdline"
    echo
    start=$(now_us)
    kill -TERM "$pid"
    wait "$(cat /tmp/make-run.pid)"
    status=$?
    took=$(since "$start")
    fact "make_run_sigterm_seconds $took"
    echo "sudo make run exited $status $took s after SIGTERM"
    tail -n 3 "$out/make-run.daemon.log"
    [[ $status == 0 ]] && ((${took%.*} < 2))
}

# What sudo made in the clone belongs to the user: their own git clean or rebuild works.
owned() {
    local wrong
    ls -ld "$clone/.venv" "$clone/tcpstate.egg-info" "$clone"/monitor/sockets/_tally.*.so || return 1
    wrong=$(find "$clone" ! -user "$user")
    [[ -z $wrong ]] || { echo "not owned by $user:"; echo "$wrong" | head -n 20; return 1; }
}

# What setup added to the machine; no service it installed is enabled or running, and it
# disabled none of the machine's own (running ones may come and go: only new ones count).
footprint() {
    local label=$1 new gone
    fact "packages_$label $(packages)"
    fact "disk_mb_$label $(disk_mb)"
    units | sort >"$out/units-$label"
    new=$(comm -13 "$out/units-fresh" "$out/units-$label")
    gone=$(comm -23 "$out/units-fresh" "$out/units-$label" | grep -v '^running ')
    echo "packages $(packages), disk used $(disk_mb) MB"
    [[ -z $new ]] || { echo "enabled or running since the fresh boot:"; echo "$new"; }
    [[ -z $gone ]] || { echo "enabled at the fresh boot, not now:"; echo "$gone"; }
    [[ -z $new && -z $gone ]]
}

make_test() {
    as_user "cd tcpstate && sudo CI=true make test TESTS='$TESTS'"
    local status=$?
    grep '^setup: done in' "$out/make-test.log" | sed 's/^setup: done in \([0-9]*\) s/make_test_setup_seconds \1/' >>"$out/facts"
    return "$status"
}

make_install() {
    as_user "cd tcpstate && sudo make install"
}

# PROFILE=unit: the harness's own tools for unit_checks.py, from Debian (make test is skipped).
unit_deps() {
    DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends bpftool python3-pytest
}

unit_checks() {
    local py=$clone/.venv/bin/python
    [[ ${PROFILE:-} == unit ]] && py=/usr/bin/python3
    # As root in the user's clone: no bytecode or cache, or their git clean would meet root's files.
    CLONE=$clone FRESH_OUT=$out PYTHONDONTWRITEBYTECODE=1 "$py" -m pytest -p no:cacheprovider -v \
        --junitxml="$out/unit-checks.xml" "$clone/tests/fresh/unit_checks.py"
}

git_clean() {
    as_user "cd tcpstate && git clean -fdxq && git status --porcelain --ignored" >/tmp/left 2>&1 || { cat /tmp/left; return 1; }
    [[ ! -s /tmp/left ]] || { echo "left after git clean:"; cat /tmp/left; return 1; }
}

note "guest started: $(uname -r), up $(awk '{print $1}' /proc/uptime) s"
step facts facts
step clone clone
if [[ ${PROFILE:-} == unit ]]; then
    step make-install make_install
    step unit-deps unit_deps
    step unit-checks unit_checks
    step git-clean git_clean
    finish 0
fi
step make-run make_run
step count-run "$clone/tests/fresh/count.py" "$url" "$N"
step sigterm sigterm
step owned owned
step footprint-run footprint run
step make-test make_test
step footprint-test footprint test
step owned-test owned
step make-install make_install
step unit-checks unit_checks
step git-clean git_clean
finish 0
