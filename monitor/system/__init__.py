"""system: the process's relations with the OS: privileges dropped after attach, systemd notification, memory handed back."""
