"""Running under systemd: sd_notify, the health-gated watchdog, journald logging, crash-safe file writes."""
