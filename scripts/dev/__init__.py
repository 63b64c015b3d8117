"""Development-only helpers: the whole topology as local processes, a local redis-server, the demos."""
