"""Operating a server: admin API, metrics, access log, live machine page and trace streams."""
