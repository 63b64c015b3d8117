"""oneDNN prepacking: packed weights compute what F.linear does, and a dtype this CPU cannot pack is asked once."""
import logging

import pytest
import torch
import torch.nn.functional as F

from common.layers import cpu_gemm


def test_a_packed_weight_computes_what_f_linear_does():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    packed = cpu_gemm.prepack(w)
    if packed is None:
        pytest.fail("float32 prepacking unavailable in this torch build: the engine's CPU fast path is missing")
    x = torch.randn(5, 32)
    torch.testing.assert_close(cpu_gemm.packed_linear(x, packed), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_a_dtype_that_cannot_be_packed_is_tried_and_warned_about_once(monkeypatch, caplog):
    calls = []

    def refuse(weight, hint):
        calls.append(weight.shape)
        raise RuntimeError("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")

    monkeypatch.setattr(cpu_gemm, "_UNPACKABLE", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    with caplog.at_level(logging.WARNING, logger=cpu_gemm.__name__):
        outs = [cpu_gemm.prepack(torch.randn(16, 8).bfloat16()) for _ in range(5)]
    assert outs == [None] * 5
    assert len(calls) == 1
    warnings = [r for r in caplog.records if "prepacking unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "bfloat16" in warnings[0].getMessage()
