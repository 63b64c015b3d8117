"""Cached block values: exact round trip, and anything that is not exactly the asked-for block is refused."""
import pytest
import torch

from common.kv.block_codec import BlockGeometry, decode_block, encode_block
from common.kv.block_hash import block_hash, chain_hashes, namespace_root

GEO = BlockGeometry(torch.bfloat16, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
TOKENS = [11, 12, 13, 14]


def _kv(seed=0):
    return torch.randn(GEO.shape, generator=torch.Generator().manual_seed(seed)).to(GEO.dtype)


def test_round_trip_is_bit_exact():
    kv = _kv()
    value = encode_block(GEO, TOKENS, kv)
    assert len(value) == GEO.value_bytes
    assert torch.equal(decode_block(GEO, TOKENS, value), kv)


@pytest.mark.parametrize("damage", ["other_tokens", "truncated", "other_geometry", "garbage", "empty"])
def test_anything_else_is_refused(damage):
    value = encode_block(GEO, TOKENS, _kv())
    tokens, geo = TOKENS, GEO
    if damage == "other_tokens":
        tokens = [11, 12, 13, 15]                           # a hash collision would look like this
    elif damage == "truncated":
        value = value[:-1]
    elif damage == "other_geometry":
        geo = BlockGeometry(torch.float32, 4, 3, 2, 8)
    elif damage == "garbage":
        value = b"\x00" * len(value)
    else:
        value = b""
    assert decode_block(geo, tokens, value) is None


def test_chained_hashes_share_exactly_the_common_full_blocks():
    root = namespace_root("m", "bfloat16", 4, 0, 1)
    a = chain_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = chain_hashes(root, [1, 2, 3, 4, 5, 6, 7, 0, 9, 9, 9, 9], 4)
    assert len(a) == 2 and len(b) == 3                     # only full blocks
    assert a[0] == b[0] and a[1] != b[1]
    assert chain_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8], 4, known=a[:1]) == a
    assert a[1] == block_hash(a[0], [5, 6, 7, 8])


@pytest.mark.parametrize("other", [("m2", "bfloat16", 4, 0, 1), ("m", "float32", 4, 0, 1), ("m", "bfloat16", 8, 0, 1),
                                   ("m", "bfloat16", 4, 1, 2), ("m", "bfloat16", 4, 0, 2)])
def test_namespace_separates_models_dtypes_block_sizes_and_tp_layouts(other):
    tokens = list(range(8))
    assert chain_hashes(namespace_root("m", "bfloat16", 4, 0, 1), tokens, 4) != \
        chain_hashes(namespace_root(*other), tokens, 4)
