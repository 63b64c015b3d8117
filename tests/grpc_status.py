"""The status a gRPC call ends with, for tests that expect refusals."""
from __future__ import annotations

import grpc


def status_of(fn) -> grpc.StatusCode:
    """Call `fn` and return its status code: OK when it returns, the RPC error's code when it raises."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
