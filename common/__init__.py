"""specd common code: config, engine (models, layers, kv, spec), rpc helpers, telemetry."""
