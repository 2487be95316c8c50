"""tcp.py: the one table of TCP state numbers and the names tcpstate exports, and how an endpoint is written."""

# Kernel numbering (include/net/tcp_states.h); names are the kernel's without "TCP_".
STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}

# Values of our own, outside the kernel's range (bpf/tcpstate.h).
NONE = 0  # a reset sent where no socket matched (e.g. a closed port)
UNKNOWN = 15  # a socket tcpstate never saw enter a state

NUMBERS = {name: num for num, name in STATE_NAMES.items()}


def state_name(num: int) -> str:
    """Name of a state number as exported in labels."""
    if num == NONE:
        return "NONE"
    return STATE_NAMES.get(num, "UNKNOWN")


def endpoint_text(addr: str, port: int | None) -> str:
    """'198.18.0.2:80', '[2001:db8::1]:443'; the address alone without a port."""
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
