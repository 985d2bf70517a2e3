"""Head office's side: the `storelink hq` commands (keys, price batches, remote config, commands, status)."""
