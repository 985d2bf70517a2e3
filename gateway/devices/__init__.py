"""Device drivers run by the gateway: the entry-point registry and the supervisor that restarts failed drivers."""
