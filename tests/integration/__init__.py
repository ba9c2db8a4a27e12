"""End-to-end tests with real parts (registry, containerd, runc, skopeo): `pytest -m integration`.
"""
