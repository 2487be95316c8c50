"""README's "Kernel support" table against what tcpstate decides from each kernel's captured formats."""

import re
from pathlib import Path

import pytest

from monitor.kernel.tracefs import RAW_TRACEPOINTS

from .test_tracefs import KERNELS, layout_of

README = Path(__file__).resolve().parents[2] / "README.md"
ROWS = {  # table row -> the Signal it describes
    "transitions": "transitions", "resets sent": "resets sent", "resets sent for no socket": "resets sent for no socket",
    "resets received": "resets received", "failed-connect causes": "failed-connect causes",
    "socket-table frees": "socket-table frees", "retransmissions": "retransmissions",
    "SYN-ACK retransmissions": "SYN-ACK retransmissions", "SYNs of failed connects": "SYNs of failed connects",
    "port reuse of refused SYNs": "port reuse of refused SYNs", "reset states": "reset states",
}
RAW_ROWS = {"transitions": "inet_sock_set_state", "socket-table frees": "tcp_destroy_sock"}
FAMILY_ROWS = {"resets sent": "tcp_send_reset", "resets received": "tcp_receive_reset",
               "socket-table frees": "tcp_destroy_sock", "retransmissions": "tcp_retransmit_skb",
               "SYN-ACK retransmissions": "tcp_retransmit_synack"}


def kernel_table() -> dict:
    """{row: {kernel: cell}} of the table under "## Kernel support"."""
    text = README.read_text()
    section = text[text.index("## Kernel support"):].splitlines()
    first = next(i for i, ln in enumerate(section) if ln.startswith("|"))
    lines = []
    for ln in section[first:]:  # the first table only
        if not ln.startswith("|"):
            break
        lines.append(ln)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    kernels = [h.split(" ")[0] for h in header[1:]]
    table = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table[cells[0]] = dict(zip(kernels, cells[1:]))
    return table


def test_the_table_has_a_column_per_kernel_and_a_row_per_count():
    table = kernel_table()
    assert set(ROWS) | {"reset reasons"} == set(table)
    assert all(list(cells) == list(KERNELS) for cells in table.values())


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_cell_says_what_the_code_does_on_that_kernel(tmp_path, kernel):
    layout = layout_of(tmp_path, kernel)
    signals = {s.name: s for s in layout.signals()}
    table = kernel_table()
    for row, name in ROWS.items():
        cell, source = table[row][kernel], signals[name].source
        if source is None:
            assert "not counted" in cell, (row, kernel, cell)
            continue
        # "tcp:tcp_send_reset (layout …)" -> tcp_send_reset; "sock.sk_err (offset …)" -> sk_err
        token = re.split(r"[:.]", source.split(" ")[0])[-1]
        assert f"`{token}`" in cell, (row, kernel, cell, source)
        tracepoint = RAW_ROWS.get(row) or FAMILY_ROWS.get(row)
        raw = tracepoint in RAW_TRACEPOINTS and layout.raw_tracepoints  # the socket's own family
        if tracepoint in RAW_TRACEPOINTS:
            assert ("raw tracepoint" in cell) == raw, (row, kernel, cell)
        sockaddr = tracepoint == "tcp_send_reset" and layout.send_reset_variant == "sockaddr"  # family inside
        if tracepoint and not sockaddr and not raw:
            assert ("no `family`" in cell) == (not layout.has_field(tracepoint, "family")), (row, kernel, cell)
    # Failed retransmissions are reported, and left out, only where the tracepoint has err.
    assert ("`err`" in table["retransmissions"][kernel]) == layout.has_field("tcp_retransmit_skb", "err")
    reasons = table["reset reasons"][kernel]
    if not layout.reason_names:
        assert reasons.startswith("none")
    elif set(layout.reason_names.values()) == {"NO_SOCKET"}:
        assert reasons == "`NO_SOCKET` only"
    else:
        assert "`sk_rst_reason` names" in reasons


def test_the_architecture_names_every_folder_and_module():
    """README's "Architecture" lists each folder of monitor/ and each of its modules: a newcomer
    finds every file there, and no file the tree no longer has."""
    text = README.read_text()
    block = text[text.index("## Architecture"):text.index("## Development")]
    root = README.parent / "monitor"
    for d in sorted(p.parent for p in root.rglob("__init__.py")):
        if d != root and d.parent == root:
            assert f"monitor/{d.name}/" in block, d
    for module in sorted(root.rglob("*.py")):
        if module.name != "__init__.py":
            assert module.stem in block, module
    for name in re.findall(r"\b(\w+)\.py\b", block):
        assert list(root.rglob(f"{name}.py")) or list((README.parent / "tests").rglob(f"{name}.py")), name
