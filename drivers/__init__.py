"""Device drivers, one small module per device type, found through the `storelink.drivers` entry points."""
