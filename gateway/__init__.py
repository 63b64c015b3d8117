"""The gateway: owns each request's token history, runs the draft→verify rounds, streams text to clients."""
