"""specd common code: config, the engine (models, layers, kv, engine, speculative), rpc helpers, telemetry."""
