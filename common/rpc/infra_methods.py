"""The gRPC infrastructure methods every server carries (health checks, reflection): they are never traced, never
counted or refused by admission, and need no API key. One definition for the interceptors that skip them."""
from __future__ import annotations

# Full-method prefixes (`/package.Service/Method`): the standard health service, and reflection (v1 and v1alpha).
INFRA_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
