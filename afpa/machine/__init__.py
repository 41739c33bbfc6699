"""The machine layer: tables, the module registry, the driver and the scopes (no I/O)."""
