"""The verifier service: the target model (tensor-parallel) scoring draft tokens for many sessions at once."""
