"""d7y-node: one process per host that mirrors registries, stores verified pieces, and serves them."""

__version__ = "0.1.0"
