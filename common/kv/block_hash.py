"""Chained block hashes: a full KV block is named by its parent block's hash and its own token ids.

Two sequences that share their first n full blocks share those n hashes, whatever follows, so the longest
cached prefix is the longest run of hashes found in a store. The chain starts from a namespace root, so
blocks of another model, dtype, block size or TP layout never match.
"""
from __future__ import annotations

import hashlib
import struct


def namespace_root(model_fingerprint: str, dtype: str, block_size: int, tp_rank: int, tp_size: int) -> bytes:
    """The chain's root: everything besides the tokens that decides what a block's K/V bytes are."""
    ident = f"specd-kv-v1|{model_fingerprint}|{dtype}|bs={block_size}|tp={tp_rank}/{tp_size}"
    return hashlib.sha256(ident.encode()).digest()


def tenant_root(root: bytes, cache_namespace: str) -> bytes:
    """The root of one tenant's chains: blocks are shared only between sequences with the same `cache_namespace`;
    "" is the shared namespace and keeps `root` itself (nothing changes where no tenant is named)."""
    if not cache_namespace:
        return root
    return hashlib.sha256(root + b"|tenant=" + cache_namespace.encode()).digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}i", *token_ids)).digest()


def chain_hashes(root: bytes, token_ids: list[int], block_size: int, num_blocks: int | None = None,
                 known: list[bytes] | None = None) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` (at most `num_blocks`), reusing the `known` leading ones."""
    full = len(token_ids) // block_size
    n = full if num_blocks is None else min(full, num_blocks)
    hashes = list((known or [])[:n])
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), n):
        parent = block_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes
