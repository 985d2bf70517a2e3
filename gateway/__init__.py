"""StoreLink: the store-edge gateway."""

__version__ = "0.1.0"
