"""d7y-node: one process per host that mirrors registries and serves verified pieces."""

__version__ = "0.1.0"
