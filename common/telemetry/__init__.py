"""Observability shared by the services: OpenTelemetry tracing over gRPC and Prometheus metrics."""
