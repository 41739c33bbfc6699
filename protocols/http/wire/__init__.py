"""HTTP/1 on the wire: request parsing, path normalisation, response heads."""
