"""In-memory stand-ins for the draft and verifier grpc.aio stubs: a target that continues a sequence by a rule,
real protobuf replies, real AioRpcErrors, and a record of every call. No models, no network."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from common.errors import RoundMismatchError, UnknownSessionError
from common.rpc.errors import REASON_KEY
from common.rpc.generated.specd.v1 import common_pb2, draft_pb2, verifier_pb2

VOCAB = 50


def rule(last: int) -> int:
    """The target's greedy continuation: the token after `last`."""
    return (last + 1) % VOCAB


def target_output(prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """What the target alone produces (plain greedy decoding), up to and including EOS."""
    out = []
    while len(out) < max_tokens and (not out or out[-1] != eos):
        out.append(rule((prompt + out)[-1]))
    return out


FINGERPRINT = "fake-vocab-fp"


def rpc_error(code: grpc.StatusCode, details: str = "injected", reason: str | None = None) -> grpc.aio.AioRpcError:
    """An AioRpcError as a specd service sends it: `reason` in the `specd-reason` trailing metadata."""
    trailing = grpc.aio.Metadata(*(((REASON_KEY, reason),) if reason else ()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@dataclass
class Session:
    tokens: list[int]          # what the verifier's KV holds: committed tokens and the accepted drafts
    round: int                 # the round it expects next


class FakeVerifier:
    """Verifies drafts against `rule`: accepts d_i while it follows the rule, then emits the rule's token (recovered
    at the first mismatch, bonus when all are accepted). Sessions behave as the real verifier's: created only by a
    Verify whose new_tokens hold every committed token, NOT_FOUND otherwise, FAILED_PRECONDITION on a round
    mismatch. `restarts` (call indices): forget every session before that call; `faults`: {call index: code to
    raise}; `hang_at`: calls that never answer."""

    def __init__(self, batch_sizes=(1,), restarts=(), faults=None, hang_at=(), release_fault=None):
        self.sessions: dict[str, Session] = {}
        self.batch_sizes = list(batch_sizes)
        self.restarts, self.faults, self.hang_at = set(restarts), dict(faults or {}), set(hang_at)
        self.release_fault = release_fault
        self.requests: list[verifier_pb2.VerifyRequest] = []       # every Verify call, failed ones included
        self.answered: list[tuple[verifier_pb2.VerifyRequest, verifier_pb2.VerifyReply]] = []
        self.released: list[str] = []
        self.timeouts: set[float] = set()

    async def Verify(self, req: verifier_pb2.VerifyRequest, timeout: float) -> verifier_pb2.VerifyReply:
        call = len(self.requests)
        self.requests.append(req)
        self.timeouts.add(timeout)
        if call in self.restarts:
            self.sessions.clear()
        if call in self.hang_at:
            await asyncio.Event().wait()
        if call in self.faults:
            raise rpc_error(self.faults[call])
        s = self.sessions.get(req.session_id)
        if s is None:
            if len(req.new_tokens) != req.committed_len:
                raise rpc_error(grpc.StatusCode.NOT_FOUND, f"session {req.session_id} not found",
                                UnknownSessionError.reason)
            s = self.sessions[req.session_id] = Session([], req.round)
        if req.round != s.round or len(s.tokens) + len(req.new_tokens) != req.committed_len:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, f"expects round {s.round}, got {req.round}",
                            RoundMismatchError.reason)
        s.tokens += req.new_tokens
        accepted = []
        for d in req.draft_token_ids:
            if d != rule(s.tokens[-1]):
                break
            accepted.append(d)
            s.tokens.append(d)
        s.round += 1
        reply = verifier_pb2.VerifyReply(
            accepted_token_ids=accepted, next_token_id=rule(s.tokens[-1]),
            is_bonus=len(accepted) == len(req.draft_token_ids),
            rollback=verifier_pb2.KvRollback(truncate_to=len(s.tokens), round=req.round),
            batch_size=self.batch_sizes[len(self.answered) % len(self.batch_sizes)], compute_ms=2.0, queue_ms=0.5)
        self.answered.append((req, reply))
        return reply

    async def Release(self, req: verifier_pb2.ReleaseRequest, timeout: float) -> verifier_pb2.ReleaseReply:
        self.released.append(req.session_id)
        if self.release_fault is not None:
            raise rpc_error(self.release_fault)
        return verifier_pb2.ReleaseReply(released=self.sessions.pop(req.session_id, None) is not None)


class FakeDraft:
    """Proposes K tokens by `rule`, except at absolute positions where `miss(position)` is true (there it proposes
    a wrong token); sampled requests get a two-token q′ per position. `faults`: {call index: code to raise}.
    Pre-drafts (guess_next) append the rule's next token as the guess, except where `wrong_guess(position)`;
    `pre_draft_faults`: codes raised by pre-draft calls (the i-th pre-draft call raises the i-th, None = answers);
    `v1_1`: ignores guess_next, as a draft that predates it."""

    def __init__(self, miss=lambda position: False, faults=None, fingerprint=FINGERPRINT, k_max=8,
                 max_model_len=4096, info_faults=(), wrong_guess=lambda position: False, pre_draft_faults=(),
                 v1_1=False):
        self.miss, self.faults = miss, dict(faults or {})
        self.wrong_guess, self.pre_draft_faults, self.v1_1 = wrong_guess, list(pre_draft_faults), v1_1
        self.info = common_pb2.ModelInfo(vocab_fingerprint=fingerprint, k_max=k_max, max_model_len=max_model_len)
        self.info_faults = set(info_faults)                  # Info call indices that fail UNAVAILABLE
        self.info_calls = 0
        self.requests: list[draft_pb2.ProposeRequest] = []
        self.answered: list[tuple[draft_pb2.ProposeRequest, draft_pb2.ProposeReply]] = []
        self.timeouts: set[float] = set()

    async def Info(self, req: common_pb2.InfoRequest, timeout: float) -> common_pb2.ModelInfo:
        call, self.info_calls = self.info_calls, self.info_calls + 1
        if call in self.info_faults:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return self.info

    async def Propose(self, req: draft_pb2.ProposeRequest, timeout: float) -> draft_pb2.ProposeReply:
        call = len(self.requests)
        self.requests.append(req)
        self.timeouts.add(timeout)
        if call in self.faults:
            raise rpc_error(self.faults[call])
        context, guess = list(req.context_token_ids), None
        if req.guess_next and not self.v1_1:
            if self.pre_draft_faults and (fault := self.pre_draft_faults.pop(0)) is not None:
                raise rpc_error(fault)
            guess = rule(context[-1]) if not self.wrong_guess(len(context)) else (rule(context[-1]) + 5) % VOCAB
            context.append(guess)
        tokens, last = [], context[-1]
        for i in range(req.k):
            t = rule(last) if not self.miss(len(context) + i) else (rule(last) + 7) % VOCAB
            tokens.append(t)
            last = t
        dists = [common_pb2.SparseDistribution(token_ids=[t, (t + 3) % VOCAB], probs=[0.625, 0.375])
                 for t in tokens] if req.sampling.temperature > 0 else []
        reply = draft_pb2.ProposeReply(token_ids=tokens, dists=dists, compute_ms=1.0, queue_ms=0.25, batch_size=1,
                                       guessed_token_id=guess)
        self.answered.append((req, reply))
        return reply
