"""The verifier engine when its KV cache is too small for its traffic: new sessions wait or are refused before they
start, running sessions that cannot grow preempt the ones with the least progress (re-prefilled by the caller, with
identical output), and one long request never fails the others of its batch."""
import contextlib
import random
import threading
import time

import pytest

from common.config import EngineConfig
from common.engine.tp_executor import TPExecutor
from common.errors import KVCacheExhaustedError, UnknownSessionError
from common.llm import LLM
from common.speculative.params import SamplingParams
from common.speculative.proposal import DraftProposal
from tests.checkpoints import build_model_folder
from tests.reliability import wait_until
from verifier_service.engine import VerifierEngine, VerifyCall

GREEDY = SamplingParams()
BLOCK = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("kv-admission") / "target", seed=21))


def _engine(folder, num_blocks, **kw):
    ex = TPExecutor(EngineConfig(model=folder, dtype="float32", block_size=BLOCK, num_kv_blocks=num_blocks))
    return ex, VerifierEngine(ex, k_max=4, max_queue=256, **kw)


def _alone(folder, prompts, n):
    """Each prompt's greedy continuation, generated on its own by the in-process target."""
    with LLM(folder, dtype="float32", kv_cache_memory_gib=0.02) as llm:
        return [llm.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids for p in prompts]


def _call(sid, rnd, committed, new, drafts=()):
    return VerifyCall(sid, rnd, committed, list(new), DraftProposal(list(drafts)), GREEDY)


class Client:
    """What the gateway's round loop does with one request (gateway/rounds.py): rounds with drafts taken from the
    known continuation (a wrong one every third round), and one re-prefill per round when the session is lost."""

    def __init__(self, engine, i, prompt, expected, k=3):
        self.engine, self.i, self.prompt, self.expected, self.k = engine, i, prompt, expected, k
        self.out, self.round, self.sid, self.pending = [], 0, f"q{i}", list(prompt)
        self.resyncs, self.refused, self.answered_after_s, self.done_after_s, self.error = 0, None, None, None, None

    def first(self):
        self.t0 = time.monotonic()
        fut = self.engine.submit(self._next())
        # When the engine answered (a refusal's latency, not when this client's thread got to look at it).
        fut.add_done_callback(lambda f: setattr(self, "answered_after_s", time.monotonic() - self.t0))
        return fut

    def _next(self):
        n = len(self.out)
        k = min(self.k, len(self.expected) - 1 - n)
        drafts = list(self.expected[n:n + k])
        if drafts and (self.i + self.round) % 3 == 0:
            drafts[-1] = (drafts[-1] + 1) % 128
        return _call(self.sid, self.round, len(self.prompt) + n, self.pending, drafts)

    def run(self, fut):
        try:
            while True:
                try:
                    r = fut.result(120)
                except UnknownSessionError:
                    self.resyncs += 1
                    self.sid, self.pending = f"q{self.i}-{self.round}-resync", self.prompt + self.out
                    r = self.engine.submit(self._next()).result(120)    # a second loss in one round fails it
                self.out += r.accepted + [r.next_token]
                self.pending, self.round = [r.next_token], self.round + 1
                if len(self.out) >= len(self.expected):
                    break
                fut = self.engine.submit(self._next())
            self.done_after_s = time.monotonic() - self.t0
            self.engine.release(self.sid)
        except KVCacheExhaustedError as e:
            if self.round:                                           # only a request that never started is refused
                self.error = e
            self.refused = str(e)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_traffic_three_times_the_cache_completes_exactly_or_is_refused_up_front(folder):
    num_blocks, n_tokens = 48, 24
    rng = random.Random(7)
    lengths = [rng.randint(8, 20) for _ in range(32)]
    lengths[0] = 200                                        # 50 blocks: more than the whole cache, never fits
    lengths[12] = 150                                       # 38 blocks: fits only when almost alone
    prompts = [[rng.randrange(1, 128) for _ in range(n)] for n in lengths]
    assert sum(-(-n // BLOCK) for n in lengths[1:]) >= 3 * num_blocks      # without the one that never fits
    expected = _alone(folder, prompts, n_tokens)
    ex, engine = _engine(folder, num_blocks, max_waiting=16)
    try:
        clients = [Client(engine, i, p, e) for i, (p, e) in enumerate(zip(prompts, expected))]
        futures = [c.first() for c in clients]              # 32 first rounds in flight at once
        threads = [threading.Thread(target=c.run, args=(f,)) for c, f in zip(clients, futures)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        assert [c.error for c in clients if c.error] == []
        done = [c for c in clients if c.refused is None]
        refused = [c for c in clients if c.refused is not None]
        for c in done:                                       # exact, whatever waiting and preemption happened
            assert c.out[:n_tokens] == list(c.expected), f"request {c.i}"
        assert "the whole cache holds 48" in clients[0].refused and "200" in clients[0].refused
        assert clients[12].refused is None                  # the long prompt waited its turn and ran
        first_done = min(c.done_after_s for c in done)
        for c in refused:                   # immediate: before any request finished, not after waiting for blocks
            assert c.answered_after_s < min(2.0, first_done), (c.i, c.answered_after_s, first_done)
            assert "KV" in c.refused
        assert len(refused) >= 2 and len(done) >= 16
        assert engine.preemptions > 0 and sum(c.resyncs for c in done) > 0
        assert len(engine.sessions) == 0 and engine.waiting == 0
        assert ex.allocator.num_free == num_blocks
    finally:
        engine.shutdown()
        ex.shutdown()


def test_a_session_that_cannot_grow_preempts_the_one_with_least_progress(folder):
    # 6 blocks of 4 tokens; the watermark is 2 blocks (one round of K_max + 1 = 5 tokens).
    a_prompt, b_prompt = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]
    a_exp, b_exp = _alone(folder, [a_prompt, b_prompt], 20)
    ex, engine = _engine(folder, 6)
    try:
        a = engine.submit(_call("a", 0, 8, a_prompt)).result(30)
        assert a.next_token == a_exp[0]
        b = engine.submit(_call("b", 0, 4, b_prompt)).result(30)    # 1 block + 2 watermark of 4 free: admitted
        out = [a.next_token]
        for rnd in (1, 2, 3):                # 4 drafts accepted each round: A holds 13, 18, then 23 tokens
            r = engine.submit(_call("a", rnd, 8 + len(out), [out[-1]], a_exp[len(out):len(out) + 4])).result(30)
            assert r.accepted == a_exp[len(out):len(out) + 4]
            out += r.accepted + [r.next_token]
        assert engine.preemptions == 1 and engine.sessions.get("b") is None   # B (round 1 < 3) made room
        with pytest.raises(UnknownSessionError, match="unknown here"):
            engine.submit(_call("b", 1, 5, [b.next_token])).result(30)
        resync = engine.submit(_call("b-resync", 1, 5, b_prompt + [b.next_token]))
        time.sleep(0.3)
        assert not resync.done() and engine.waiting == 1     # no blocks: it waits, it is not refused
        with pytest.raises(KVCacheExhaustedError, match="need 7 KV blocks of 4 tokens, the whole cache holds 6"):
            engine.submit(_call("a", 4, 8 + len(out), [out[-1]], a_exp[len(out):len(out) + 4])).result(30)
        assert engine.sessions.get("a") is None              # A alone could never grow so far: it failed alone
        r = resync.result(30)                                 # admitted once A's blocks came back
        assert [b.next_token, r.next_token] == b_exp[:2]
        engine.release("b-resync")
        assert ex.allocator.num_free == 6 and len(engine.sessions) == 0
    finally:
        engine.shutdown()
        ex.shutdown()


@contextlib.contextmanager
def _one_waiter(folder):
    """An 8-block cache with one session holding 5 blocks and a second one waiting (2 + 2 watermark > 3 free);
    at most one may wait. Yields (executor, engine, the waiting call's future); idle afterwards is the test's job."""
    ex, engine = _engine(folder, 8, max_waiting=1)
    try:
        engine.submit(_call("big", 0, 20, list(range(1, 21)))).result(30)
        waiting = engine.submit(_call("w", 0, 8, list(range(1, 9))))
        time.sleep(0.3)
        assert not waiting.done() and engine.waiting == 1
        yield ex, engine, waiting
    finally:
        engine.shutdown()
        ex.shutdown()


def test_waiting_sessions_are_admitted_after_a_release_and_refused_past_the_bound(folder):
    with _one_waiter(folder) as (ex, engine, waiting):
        t = time.monotonic()
        with pytest.raises(KVCacheExhaustedError, match=r"max_waiting=1"):
            engine.submit(_call("x", 0, 8, list(range(1, 9)))).result(30)
        assert time.monotonic() - t < 1.0
        engine.release("w")                                       # released while it waited: its call fails
        with pytest.raises(UnknownSessionError, match="released while waiting"):
            waiting.result(30)
        later = engine.submit(_call("later", 0, 8, list(range(2, 10))))
        time.sleep(0.3)
        assert not later.done() and engine.waiting == 1
        engine.release("big")                                     # no traffic: the tick admits the waiter
        assert later.result(10).truncate_to == 8
        engine.release("later")
        assert ex.allocator.num_free == 8 and len(engine.sessions) == 0 and engine.waiting == 0


def test_a_waiting_call_whose_caller_went_away_gives_up_its_place(folder):
    with _one_waiter(folder) as (ex, engine, waiting):
        engine.abandon(waiting)                      # what the servicer does when the RPC is cancelled
        wait_until(lambda: engine.waiting == 0, 5, "the abandoned call dropped", interval_s=0.02)
        assert waiting.done()
        other = engine.submit(_call("x", 0, 8, list(range(1, 9))))                    # the bound has room again
        time.sleep(0.3)
        assert engine.waiting == 1 and not other.done()
        engine.release("x")
        engine.release("big")
        assert ex.allocator.num_free == 8 and len(engine.sessions) == 0 and engine.waiting == 0
