"""The HTTP model server: repository, protocols, batching, traffic split, metrics."""
