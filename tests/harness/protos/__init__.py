"""Generated protobuf modules of the tests (`make test-protos`), and their .proto sources."""
