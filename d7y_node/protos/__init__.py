"""Protobuf messages of containerd's snapshots API (a subset, containerd's field numbers).

`*_pb2.py` and `*_pb2.pyi` are generated from the `.proto` files here by `make protos`; edit the
`.proto` files, never the generated modules.
"""
