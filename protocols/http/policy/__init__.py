"""HTTP rules: caching (RFC 9111), conditionals, ranges, forwarding, invalidation."""
