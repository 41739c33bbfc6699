"""The network layer: the only code that touches Twisted transports (stream connections, outbound exchanges, relays, the Send Engine, TLS, the reactor)."""
