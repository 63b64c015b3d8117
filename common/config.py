"""Self-validating configuration dataclasses shared by the engine and the services."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError, ConfigError, UnsupportedModelError

# Architectures one implementation (common/models/llama_family.py) covers, with what sets them apart.
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"           # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported (supported: default, llama3, linear)")
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta={self.theta} and factor={self.factor} must be > 0")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "RopeConfig":
        # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
        params = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        merged = {**scaling, **params}
        theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Qwen2/Qwen3/Llama-family checkpoint, read from its config.json."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config {name}={getattr(self, name)}: must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model folder {str(path)!r} does not exist (run `make models`, or pass a "
                                  "folder holding config.json and *.safetensors)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(cfg, source=str(cfg_file))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        traits = SUPPORTED_ARCHITECTURES[arch]
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", traits["qkv_bias"])),
                qk_norm=traits["qk_norm"],
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                rope=RopeConfig.from_hf(cfg),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from e


@dataclass(slots=True)
class PrefixCacheConfig:
    """The prefix cache of full KV blocks (common/kv/prefix_cache.py): an in-process LRU, then Redis.

    Redis values carry an HMAC-SHA256 tag under `hmac_key` (common/kv/block_auth.py): a Redis URL without a key
    is refused unless `unauthenticated` says that Redis is trusted with the cached K/V's integrity too."""
    local_mib: int = 256                      # in-process tier; 0 = Redis only
    redis_url: str | None = None              # e.g. redis://host:6379/0 or rediss://...; None = no shared tier
    ttl_s: int = 3600                         # Redis entries expire after this long without a refresh
    redis_timeout_s: float = 0.25             # a slower Redis call is abandoned and the cache bypassed
    redis_retry_s: float = 5.0                # after a Redis failure, bypass it this long before trying again
    publish_queue: int = 256                  # pending publishes; beyond it new blocks are not published
    namespace: str | None = None              # overrides the model fingerprint in block hashes
    hmac_key: bytes | None = field(default=None, repr=False)         # authenticates every Redis value
    unauthenticated: bool = False             # allow Redis without hmac_key: anyone who can write it steers outputs
    redis_password: str | None = field(default=None, repr=False)     # Redis AUTH, when not in the URL

    def __post_init__(self):
        if self.local_mib < 0:
            raise ConfigError(f"prefix cache local_mib={self.local_mib}: must be >= 0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis_url={redacted_url(self.redis_url)!r}: must start with redis://, rediss:// "
                              "or unix://")
        if self.local_mib == 0 and not self.redis_url:
            raise ConfigError("prefix cache: local_mib=0 and no redis_url leaves no tier; disable it instead")
        for name in ("ttl_s", "redis_timeout_s", "redis_retry_s", "publish_queue"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prefix cache {name}={getattr(self, name)}: must be > 0")
        if self.hmac_key is not None and len(self.hmac_key) < 16:
            raise ConfigError(f"prefix cache HMAC key of {len(self.hmac_key)} bytes: must be >= 16 "
                              "(e.g. `openssl rand -hex 32`)")
        if self.redis_url and self.hmac_key is None and not self.unauthenticated:
            raise ConfigError("prefix cache: a Redis URL without an HMAC key would let anyone who can write to Redis "
                              "steer other users' outputs; give --prefix-cache-hmac-key-file "
                              "(SPECD_PREFIX_CACHE_HMAC_KEY_FILE), or --prefix-cache-unauthenticated to trust Redis")
        if self.redis_password is not None and self.redis_url and _url_password(self.redis_url):
            raise ConfigError("prefix cache: a Redis password both in the URL and in a password file; give one")


def _url_password(url: str) -> str | None:
    from urllib.parse import urlsplit
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redacted_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for logs and errors."""
    from urllib.parse import urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs a model: precision, device, KV cache geometry, tensor parallelism."""
    model: str                                # path of a Hugging Face folder with *.safetensors
    dtype: str = "float32"                    # "float32" | "bfloat16" | "float16"
    device: str = "cpu"                       # "cpu" | "cuda" | "cuda:N"
    tp_size: int = 1
    block_size: int = 16                      # tokens per KV block
    num_kv_blocks: int | None = None          # None: derived from kv_cache_memory_gib
    kv_cache_memory_gib: float = 1.0
    max_model_len: int | None = None          # None: the model's max_position_embeddings (capped at 32768)
    max_num_seqs: int = 64
    cpu_prepack: bool = True                  # oneDNN-packed matmul weights on CPU (common/layers/cpu_gemm.py)
    # A token's logits independent of what shares its forward pass (common/layers/batch_invariant.py): bf16
    # speculation then equals bf16 target-only bit for bit. CPU only.
    batch_invariant: bool = False
    prefix_cache: PrefixCacheConfig | None = None   # None: every prefill is computed
    # Weight-only quantization of the matmul weights (common/layers/quantization.py): "none" | "int8" | "int4".
    quantization: str = "none"
    # Under int4, a GGUF file of the same model whose Q4_K tensors load with their own 4-bit codes
    # (common/models/gguf_weights.py); the folder still gives config, tokenizer and every other weight.
    gguf: str | None = None
    # The LM head's quantization: None = the method's default (int8 under int8 and int4: the head decides the logits
    # the sampler sees). A draft may run an int4 head: its logits only pick proposals, the target decides every
    # token, so exactness does not depend on it (LLM and the draft service do so under int4).
    lm_head_quantization: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r}: must be 'cpu', 'cuda' or 'cuda:N'")
        if not 1 <= self.tp_size <= 64:
            raise ConfigError(f"tp_size={self.tp_size}: must be in [1, 64]")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ConfigError(f"block_size={self.block_size}: must be a power of two in [1, 256]")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks}: must be >= 1")
        if self.kv_cache_memory_gib <= 0:
            raise ConfigError(f"kv_cache_memory_gib={self.kv_cache_memory_gib}: must be > 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len={self.max_model_len}: must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.batch_invariant and self.device != "cpu":
            raise ConfigError(f"batch_invariant=True with device={self.device!r}: measured on CPU kernels only")
        from common.layers.quantization import check_method
        check_method(self.quantization)
        if self.quantization != "none" and self.device != "cpu":
            raise ConfigError(f"quantization={self.quantization!r} with device={self.device!r}: the quantized "
                              "kernels are measured on CPU only")
        if self.lm_head_quantization is not None:
            if self.lm_head_quantization not in ("int8", "int4"):
                raise ConfigError(f"lm_head_quantization={self.lm_head_quantization!r}: must be 'int8', 'int4' or "
                                  "None (the quantization's default)")
            if self.quantization == "none":
                raise ConfigError(f"lm_head_quantization={self.lm_head_quantization!r} with quantization='none': "
                                  "only a quantized model's head can be quantized")
        if self.gguf is not None and self.quantization != "int4":
            raise ConfigError(f"gguf={self.gguf!r} with quantization={self.quantization!r}: a GGUF's Q4_K codes load "
                              "exactly only under quantization='int4'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_model(self, model: ModelConfig) -> None:
        """Raise if this engine setting cannot run `model` (TP must split heads evenly)."""
        tp = self.tp_size
        if model.num_heads % tp or model.num_kv_heads % tp:
            raise ConfigError(
                f"tp_size={tp} must divide num_attention_heads={model.num_heads} and "
                f"num_key_value_heads={model.num_kv_heads}; valid tp sizes: "
                f"{[d for d in range(1, model.num_kv_heads + 1) if model.num_kv_heads % d == 0 and model.num_heads % d == 0]}")
        if model.intermediate_size % tp:
            raise ConfigError(f"tp_size={tp} must divide intermediate_size={model.intermediate_size}")

    def resolved_max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if self.max_model_len is None:
            return min(limit, 32768)
        if self.max_model_len > limit:
            raise ConfigError(f"max_model_len={self.max_model_len}: must be <= the model's "
                              f"max_position_embeddings={limit}")
        return self.max_model_len

    def resolved_num_kv_blocks(self, model: ModelConfig) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        per_block = (2 * model.num_layers * self.block_size * (model.num_kv_heads // self.tp_size)
                     * model.head_dim * torch.empty((), dtype=self.torch_dtype).element_size())
        return max(1, math.floor(self.kv_cache_memory_gib * 2**30 / per_block))


def draft_lm_head_quantization(quantization: str) -> str | None:
    """The LM head a draft runs under `quantization`: int4 under int4 (its logits only pick proposals; the int8 head
    is 146 of the 0.5B draft's 360 MB per step), else the method's default."""
    return "int4" if quantization == "int4" else None
