"""Where a request that missed the cache goes: routes and, later, backend pools."""
