"""The ModelInfo a model service reports (the gateway compares vocab fingerprints at start-up)."""
from __future__ import annotations

from pathlib import Path

from common.layers.quantization import numerics_of
from common.rpc.generated.specd.v1 import common_pb2
from common.tokenizer import load_tokenizer, vocab_fingerprint


def model_info(model_path: str, runner, dtype: str, device: str, tp_size: int, k_max: int,
               pass_cost_ratio: list[float] = ()) -> common_pb2.ModelInfo:
    config = runner.config
    quantization = numerics_of(config.quantization) + ("+gguf" if config.gguf else "")   # e.g. int4/vnni+gguf
    return common_pb2.ModelInfo(model_id=Path(model_path).name, vocab_fingerprint=vocab_fingerprint(
        load_tokenizer(model_path)), vocab_size=runner.model_config.vocab_size, dtype=dtype, device=device,
        tp_size=tp_size, max_model_len=runner.max_model_len, k_max=k_max,
        eos_token_ids=list(runner.model_config.eos_token_ids), quantization=quantization,
        pass_cost_ratio=list(pass_cost_ratio))
