"""The WAN emulator: measured RTT within 10% of the setting, bytes unchanged and in order, delay changed live."""
from __future__ import annotations

import os
import socket
import socketserver
import statistics
import threading
import time

import pytest

from bench.delay_proxy import DelayProxy, Route, parse_route


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return bytes(out)


def _median_rtt(port: int, pings: int = 15) -> float:
    with _connect(port) as s:
        rtts = []
        for i in range(pings):
            msg = f"ping {i:04d}".encode()
            t = time.perf_counter()
            s.sendall(msg)
            assert _recv_exactly(s, len(msg)) == msg
            rtts.append(time.perf_counter() - t)
    return statistics.median(rtts)


@pytest.mark.parametrize("delay_ms", [5.0, 12.5])
def test_measured_rtt_is_within_ten_percent_of_the_setting(echo_port, delay_ms):
    with DelayProxy([Route(0, "127.0.0.1", echo_port)], delay_ms / 1000) as proxy:
        rtt = _median_rtt(proxy.routes[0].port)
    assert abs(rtt - 2 * delay_ms / 1000) <= 0.1 * 2 * delay_ms / 1000, f"RTT {rtt * 1000:.2f} ms"


def test_without_the_proxy_the_rtt_is_far_below_the_delays_measured(echo_port):
    # The negative control: the echo server alone answers in well under a millisecond, so the RTTs above are the
    # proxy's doing, not the machine's.
    assert _median_rtt(echo_port) < 0.002


def test_bytes_arrive_unchanged_and_in_order_under_jitter(echo_port):
    payload = os.urandom(1 << 20)
    with DelayProxy([Route(0, "127.0.0.1", echo_port)], 0.002, jitter_s=0.004, seed=1) as proxy:
        with _connect(proxy.routes[0].port) as s:
            sender = threading.Thread(target=lambda: [s.sendall(payload[i:i + 4096])
                                                      for i in range(0, len(payload), 4096)])
            sender.start()
            echoed = _recv_exactly(s, len(payload))
            sender.join()
        assert proxy.bytes_forwarded == 2 * len(payload)
    assert echoed == payload


def test_the_delay_changes_on_an_open_connection(echo_port):
    with DelayProxy([Route(0, "127.0.0.1", echo_port)], 0.0) as proxy:
        port = proxy.routes[0].port
        with _connect(port) as s:
            def rtt() -> float:
                t = time.perf_counter()
                s.sendall(b"x")
                _recv_exactly(s, 1)
                return time.perf_counter() - t
            fast = min(rtt() for _ in range(5))
            proxy.set_delay(0.02)
            slow = min(rtt() for _ in range(5))
    assert fast < 0.005 and 0.036 <= slow <= 0.044


def test_a_grpc_health_check_passes_through(echo_port):
    # gRPC's own framing (HTTP/2 over one long-lived connection) crosses the proxy unchanged.
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with DelayProxy([Route(0, "127.0.0.1", port)], 0.01) as proxy:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.routes[0].port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)          # connect
                t = time.perf_counter()
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                rtt = time.perf_counter() - t
    finally:
        server.stop(0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert 0.018 <= rtt <= 0.03


def test_route_parsing_names_the_expected_form():
    r = parse_route("127.0.0.1:6001=10.0.0.2:50052")
    assert (r.listen_port, r.upstream_host, r.upstream_port) == (6001, "10.0.0.2", 50052)
    with pytest.raises(Exception, match="LISTEN_PORT=HOST:PORT"):
        parse_route("6001")
