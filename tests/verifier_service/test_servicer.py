"""The verifier's servicer carries prompt_len in and the target's logprobs out (the engine is real, no server)."""
import asyncio

import pytest

from common.rpc.convert import logprobs_from_pb, sampling_to_pb
from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2
from common.speculative.params import SamplingParams
from common.speculative.proposal import DraftProposal
from tests.checkpoints import build_model_folder
from verifier_service.engine import VerifyCall
from verifier_service.servicer import VerifierServicer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("verifier_servicer") / "target", seed=5))


def test_verify_reply_carries_the_engines_logprobs_for_the_callers_prompt_len(engine):
    params = SamplingParams(logprobs=2, presence_penalty=1.5, frequency_penalty=1.0)
    prompt = [5, 6, 7, 5, 6]
    request = verifier_pb2.VerifyRequest(session_id="pb", round=0, committed_len=5, new_tokens=prompt,
                                         draft_token_ids=[9], sampling=sampling_to_pb(params), prompt_len=3)
    reply = asyncio.run(VerifierServicer(engine, common_pb2.ModelInfo()).Verify(request, None))
    # the same call straight to the engine, on a session of its own: what the reply must carry
    direct = engine.submit(VerifyCall("direct", 0, 5, prompt, DraftProposal([9]), params, prompt_len=3)).result(30)
    assert list(reply.accepted_token_ids) + [reply.next_token_id] == direct.accepted + [direct.next_token]
    assert logprobs_from_pb(reply.logprobs) == direct.logprobs
    assert len(reply.logprobs) == len(direct.accepted) + 1 and len(reply.logprobs[0].top_token_ids) == 2
