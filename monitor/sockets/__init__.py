"""sockets: the kernel's socket tables: sock_diag dumps counted in C, the background poller, /proc counters, namespaces, the port forecast."""
