"""kernel: the only importers of bcc: the C program's ABI, tracepoint layouts and BTF offsets, loading and attaching, map reads, offenders, the watch stream."""
