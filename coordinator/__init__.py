"""The coordinator: gRPC server, repository storage, catalog and the `clawback` CLI."""
