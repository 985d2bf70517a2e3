"""Simulated devices (fake peers that speak the real protocols) and the `storelink demo` glue; never used in a store."""
