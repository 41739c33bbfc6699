"""The shipped transition tables (data only; see the *.toml files here)."""
