"""The runtime's memory cache (byte-budgeted store of cache objects)."""
