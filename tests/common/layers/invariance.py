"""One sequence's last-token logits computed four ways on an engine (ModelRunner or TPExecutor): alone (prefill,
then 1-row decodes), inside a batch of 8 unrelated sequences, as row j of a (K+1)-row verify chunk, and after a
rollback and re-feed. Batch-invariant numerics make all four bitwise equal."""
import torch

PROMPT_LEN, CONTINUATION = 23, 4


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def four_ways(engine, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    prompt, cont = _ids(PROMPT_LEN, seed, vocab), _ids(CONTINUATION, seed + 1, vocab)
    others = [_ids(5 + 9 * i, seed + 10 + i, vocab) for i in range(7)]     # unrelated, of other lengths
    from common.engine.forward_io import SequenceChunk as Chunk
    out = {}
    # alone: prefill, then one token per pass
    engine.forward([Chunk(1, prompt)])
    for t in cont:
        last = engine.forward([Chunk(1, [t])]).logits[0][-1]
    out["alone"] = last
    # in a batch of 8: the same passes, each shared with 7 other sequences (prefills, then their own decodes)
    engine.forward([Chunk(2, prompt)] + [Chunk(10 + i, o) for i, o in enumerate(others)])
    for step, t in enumerate(cont):
        res = engine.forward([Chunk(10 + i, [o[step % len(o)]]) for i, o in enumerate(others[:3])]
                             + [Chunk(2, [t])] + [Chunk(10 + i, [o[step]]) for i, o in enumerate(others[3:], 3)])
        last = res.logits[3][-1]
    out["batch_of_8"] = last
    # row j of a verify chunk: the continuation plus 3 drafts in one pass
    engine.forward([Chunk(3, prompt)])
    chunk = cont + _ids(3, seed + 2, vocab)
    out["verify_row"] = engine.forward([Chunk(3, chunk, num_logits=len(chunk))]).logits[0][CONTINUATION - 1]
    # rollback and re-feed: two tokens kept of a rejected chunk, then the rest fed again
    engine.forward([Chunk(4, prompt)])
    engine.forward([Chunk(4, cont[:2] + _ids(5, seed + 3, vocab), num_logits=7)])
    engine.truncate(4, PROMPT_LEN + 2)
    out["rollback_refeed"] = engine.forward([Chunk(4, cont[2:], num_logits=2)]).logits[0][-1]
    for seq_id in (1, 2, 3, 4, *range(10, 17)):
        engine.free(seq_id)
    return out


def mismatches(ways: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each way's max |difference| from `alone`, for the ways that are not bitwise equal to it."""
    ref = ways["alone"]
    return {k: (v - ref).abs().max().item() for k, v in ways.items() if not torch.equal(v, ref)}
