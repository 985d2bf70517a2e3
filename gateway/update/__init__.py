"""Fleet software updates: signed release bundles, the store's agent, the root-side updater, the health gate."""
