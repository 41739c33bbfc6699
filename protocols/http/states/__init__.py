"""The HTTP state functions: client machine, backend machine, coalescing, siblings."""
