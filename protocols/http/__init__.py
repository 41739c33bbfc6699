"""The HTTP/1.x protocol module: parser, state functions, scopes and responses."""
