"""gateway/text.py: streamed text is exactly the full decode cut at the first stop string, for every chunking, at a
cost per chunk that does not grow with the output. Tokenizers: the tiny word-level one and the real Qwen / SmolLM2
ones through common/fast_tokenizer (what the gateway loads), and two in-test byte tokenizers (split UTF-8)."""
from __future__ import annotations

import functools
import random
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.fast_tokenizer import load_fast_tokenizer
from common.models.fetch import LLAMA_MODEL, TARGET_MODEL, is_fetched, model_path
from common.tokenizer import cut_at_stop
from gateway.text import IncrementalText
from tests.checkpoints import build_tokenizer

SPECIAL = 256


class ByteTokenizer:
    """Ids 0..255 are single bytes (any split of a UTF-8 character), 256 a special token, 257.. words.

    `sentencepiece=True` drops the text's leading space, as a Metaspace decoder does: a token's text then depends on
    whether it comes first, which only context tokens before it get right."""
    WORDS = [" the", " cat", "é", " 中文", "🎉", " ", "\n", "<stop>", "\ufffd"]

    def __init__(self, sentencepiece: bool = False):
        self.sentencepiece = sentencepiece
        self.vocab = 257 + len(self.WORDS)

    def piece(self, i: int) -> bytes:
        return bytes([i]) if i < SPECIAL else b"" if i == SPECIAL else self.WORDS[i - 257].encode()

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = b"".join(self.piece(i) for i in ids).decode("utf-8", "replace")
        return text[1:] if self.sentencepiece and text.startswith(" ") else text


@functools.cache
def tiny():
    folder = build_tokenizer(Path(tempfile.mkdtemp(prefix="specd-text-")) / "tiny", 16)
    return load_fast_tokenizer(folder)


@functools.cache
def real(key: str):
    if not is_fetched(key):
        pytest.skip(f"{key} is not fetched (run `make models`)")
    return load_fast_tokenizer(model_path(key))


def expected(tok, ids, stop) -> str:
    """Today's definition of a request's text: one full decode, cut at the first stop string."""
    return cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop)


def stream(tok, ids, stop, cuts) -> list[str]:
    """The deltas of a stream whose chunks end at `cuts` (the output grows; the last call is final)."""
    text = IncrementalText(tok, stop)
    ends = sorted({c for c in cuts if 0 < c < len(ids)} | {len(ids)})
    return [text.delta(ids[:end], final=end == len(ids)) for end in ends]


def check_stream(tok, ids, stop, cuts):
    want = expected(tok, ids, stop)
    deltas = stream(tok, ids, stop, cuts)
    assert "".join(deltas) == want, (ids, stop, cuts)
    assert IncrementalText(tok, stop).full_text(ids) == want        # Generate: one final call
    text = IncrementalText(tok, stop)
    for end in sorted(set(cuts)):
        if 0 < end < len(ids):
            text.delta(ids[:end], final=False)
    assert text.full_text(ids) == want                               # Generate: a delta per round, then the text


@st.composite
def case(draw, vocab: int, samples: list[list[int]] | None = None, favourites: list[int] | None = None):
    """(ids, chunk ends, a seed for the stop strings): random ids (`favourites` often) or a real text's."""
    if samples and draw(st.booleans()):
        ids = draw(st.sampled_from(samples))
    else:
        token = st.integers(0, vocab - 1)
        if favourites:
            token = st.one_of(st.sampled_from(favourites), token)
        ids = draw(st.lists(token, min_size=1, max_size=60))
    cuts = draw(st.lists(st.integers(1, len(ids)), max_size=len(ids)))
    return ids, cuts, draw(st.integers(0, 2**32 - 1))


def stops_for(tok, ids, seed) -> list[str]:
    """0-3 stop strings: mostly pieces of the text (so they do occur, at awkward places), some random."""
    rng = random.Random(seed)
    full = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(rng.randrange(4)):
        if full and rng.random() < 0.8:
            a = rng.randrange(len(full))
            stops.append(full[a:a + rng.randint(1, 12)])
        else:
            stops.append(rng.choice(["zz", "<w3><w1>", "\n\n", "é", "\ufffd"]))
    return stops


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case(vocab=16))
def test_tiny_word_level_tokenizer_any_chunking(c):
    ids, cuts, seed = c
    check_stream(tiny(), ids, stops_for(tiny(), ids, seed), cuts)


# A special token, spaces, ASCII, the bytes of "€" and "🎉", the words: where the edge cases are.
FAVOURITE_BYTES = [SPECIAL, 0x20, 0x61, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x8E, 0x89, *range(257, 266)]


@FAST
@given(case(vocab=257 + len(ByteTokenizer.WORDS), favourites=FAVOURITE_BYTES), st.booleans())
def test_split_utf8_and_context_dependent_decoders_any_chunking(c, sentencepiece):
    ids, cuts, seed = c
    tok = ByteTokenizer(sentencepiece)
    check_stream(tok, ids, stops_for(tok, ids, seed), cuts)


def test_a_split_character_and_a_possible_stop_start_are_held_back():
    tok = ByteTokenizer()
    ids = list("ab€".encode()) + [SPECIAL] + list(" cd".encode())        # € is 3 bytes
    text = IncrementalText(tok, [])
    assert [text.delta(ids[:n], final=False) for n in (3, 4)] == ["ab", ""]   # never a U+FFFD for a split char
    assert text.delta(ids[:5], final=False) == "€"
    assert text.delta(ids, final=True) == " cd"
    text = IncrementalText(tok, ["cdx", "bc"])                          # hold 2 characters
    out = [text.delta(list(s.encode()), final=False) for s in ("ab", "abxy", "abxyc")]
    assert out == ["", "ab", "x"] and text.delta(list(b"abxycdx"), final=False) == "y"
    assert text.delta(list(b"abxycdxz"), final=True) == ""              # cut at "cdx": nothing of it goes out
    assert text.full_text(list(b"abxycdxz")) == "abxy"


def test_a_window_of_skipped_tokens_only_is_no_context():
    tok = ByteTokenizer(sentencepiece=True)        # a text's leading space is dropped: only context keeps it
    ids = list(b"ab") + [SPECIAL] + list(b" cd")
    assert tok.decode(ids) == "ab cd"
    text = IncrementalText(tok, [])
    assert [text.delta(ids[:n], final=n == len(ids)) for n in (2, 3, 6)] == ["ab", "", " cd"]


def test_the_earliest_stop_wins_even_when_a_later_one_was_seen_first():
    tok = ByteTokenizer()
    text = IncrementalText(tok, ["c", "abcd"])
    assert text.delta(list(b"xabc"), final=False) == ""                 # "c" seen; "abcd" may still start at a
    assert text.delta(list(b"xabcd"), final=True) == "x"
    assert expected(tok, list(b"xabcd"), ["c", "abcd"]) == "x"


def test_nothing_is_decoded_after_a_final_stop():
    tok = ByteTokenizer()
    text = IncrementalText(tok, ["!"])
    calls = []
    tok.decode = lambda ids, skip_special_tokens=False: calls.append(len(ids)) or bytes(ids).decode()
    assert text.delta(list(b"hi! there"), final=False) == "hi"
    before = len(calls)
    assert text.delta(list(b"hi! there, more"), final=False) == ""
    assert text.full_text(list(b"hi! there, more")) == "hi" and len(calls) == before


def test_a_decoder_that_rewrites_given_text_falls_back_to_full_decodes():
    class Rewriting(ByteTokenizer):      # transformers' clean-up: " ." becomes "." once the "." arrives
        def decode(self, ids, skip_special_tokens=False):
            return super().decode(ids).replace(" .", ".")
    tok, ids = Rewriting(), list(b"a .b")
    text = IncrementalText(tok, [])
    assert [text.delta(ids[:n], final=n == len(ids)) for n in (2, 3, 4)] == ["a ", "", "b"]   # as before
    assert text._full


# ---- real tokenizers -----------------------------------------------------------------------------------------

REAL_TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "print('héllo wörld') # 🎉👍🏽 naïve café — “quotes” ½",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "a   b\t\t\n\n\n   c     \n\u00a0 \u200b zero-width",
    "emoji run: 🧑‍🚀👨‍👩‍👧‍👦🏳️‍🌈 and math ∀x∈ℝ: x² ≥ 0",
]


def real_samples(tok) -> list[list[int]]:
    specials = [i for i in tok.all_special_ids if i is not None][:2]
    samples = [tok.encode(t, add_special_tokens=False) for t in REAL_TEXTS]
    return samples + [samples[1] + specials + samples[2], specials + samples[4] + specials]


@pytest.mark.real_model
@pytest.mark.parametrize("key", [TARGET_MODEL, LLAMA_MODEL])
def test_real_tokenizers_any_chunking(key):
    tok = real(key)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case(vocab=len(tok), samples=real_samples(tok)))
    def run(c):
        ids, cuts, seed = c
        check_stream(tok, ids, stops_for(tok, ids, seed), cuts)
    run()


@pytest.mark.real_model
@pytest.mark.parametrize("key", [TARGET_MODEL, LLAMA_MODEL])
def test_real_tokenizers_every_chunk_one_token(key):
    tok = real(key)
    for ids in real_samples(tok):
        check_stream(tok, ids, [], range(len(ids)))
        check_stream(tok, ids, ["\n\n", "ö", "👍"], range(len(ids)))


# ---- cost per chunk ------------------------------------------------------------------------------------------

N_TOKENS, WINDOW = 16_000, 1_000


def chunk_costs(tok, ids, stop) -> tuple[list[float], str]:
    """Seconds of each one-token delta of a stream of `ids`, and the text it streamed."""
    text, costs, out, output = IncrementalText(tok, stop), [], [], []
    for n, token in enumerate(ids, 1):
        output.append(token)                        # one growing list, as the gateway's Request.output_ids
        t0 = time.perf_counter()
        out.append(text.delta(output, final=n == len(ids)))
        costs.append(time.perf_counter() - t0)
    return costs, "".join(out)


def assert_flat(tok, ids, stop, capsys):
    runs = []
    for _ in range(3):                               # per chunk the fastest of 3 runs: a busy machine adds noise
        costs, streamed = chunk_costs(tok, ids, stop)
        assert streamed == expected(tok, ids, stop)
        runs.append(costs)
    best = [min(c) for c in zip(*runs)]
    first, last = sum(best[:WINDOW]) / WINDOW, sum(best[-WINDOW:]) / WINDOW
    with capsys.disabled():
        print(f"\n{type(tok).__name__} {len(ids)} tokens: mean chunk cost first {WINDOW} {first * 1e6:.1f} µs, "
              f"last {WINDOW} {last * 1e6:.1f} µs, ratio {last / first:.2f}")
    assert last / first < 3, (first, last)


def test_cost_per_chunk_stays_flat_over_16000_tokens(capsys):
    rng = random.Random(0)
    ids = [rng.randrange(1, 16) for _ in range(N_TOKENS)]
    assert_flat(tiny(), ids, ["<w3><w3><w3><w3>", "never"], capsys)


@pytest.mark.real_model
def test_cost_per_chunk_stays_flat_over_16000_real_tokens(capsys):
    tok = real(TARGET_MODEL)
    ids = []
    while len(ids) < N_TOKENS:
        ids += [t for text in REAL_TEXTS for t in tok.encode(text, add_special_tokens=False)]
    assert_flat(tok, ids[:N_TOKENS], ["</answer>", "never"], capsys)
