"""The gRPC infrastructure methods (health checks, reflection, the verifier's load report): they are never traced,
never counted or refused by admission (a draining verifier still says so in its Load reply), and need no API key.
One definition for the interceptors that skip them."""
from __future__ import annotations

# Full-method prefixes (`/package.Service/Method`): the standard health service, reflection (v1 and v1alpha), and
# the Load report a gateway polls every few seconds per replica (a trace each would bury the requests' traces).
INFRA_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/specd.v1.VerifierService/Load")
