# churn-pair.sh: sourced by the load scripts: builds tests/load/churn.c into $work and joins two
# namespaces $a (client, 198.19.0.1) and $b (server, 198.19.0.2, churn server on port 5001, pid in
# $srv) with a veth pair. The caller sets work, a and b, and removes what this makes on exit.
# shellcheck shell=bash disable=SC2154,SC2034  # work, a, b come from the caller; srv goes back to it
gcc -O2 -pthread -o "$work/churn" tests/load/churn.c
ip netns add "$a"; ip netns add "$b"
ip link add tst0 netns "$a" type veth peer name tst0 netns "$b"
ip -n "$a" addr add 198.19.0.1/24 dev tst0; ip -n "$b" addr add 198.19.0.2/24 dev tst0
for n in "$a" "$b"; do ip -n "$n" link set lo up; ip -n "$n" link set tst0 up; done
ip netns exec "$a" sysctl -qw net.ipv4.ip_local_port_range="10000 65535" net.ipv4.tcp_tw_reuse=1
ip netns exec "$b" "$work/churn" server 198.19.0.2 5001 2 > "$work/srv" & srv=$!
sleep 0.3
