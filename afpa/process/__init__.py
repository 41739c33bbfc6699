"""Processes: the worker supervisor, its control channel and signal handling."""
