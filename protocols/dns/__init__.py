"""A DNS caching forwarder module: wire format, local rules, states."""
