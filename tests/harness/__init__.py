"""Reusable fixtures for tests with real parts: the CNCF registry, OCI images, containerd, d7y-node.

Each module starts one kind of real process (or a small double where a real part cannot show a
fault) and stops it again; pytest fixtures in `tests/integration/conftest.py` tie them to test
lifetimes. Nothing here asserts on d7y-node's behaviour: that is the tests' job.
"""
