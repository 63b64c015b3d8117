"""The `specd` command line and developer tooling: what sits above the services it starts."""
