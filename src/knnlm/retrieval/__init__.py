"""Fewer and cheaper searches: RetoMaton pointers, adaptive retrieval, smaller datastores, device search."""
