"""The draft's servicer hands prompt_len to the drafter with the rest of the call (a real drafter, no server)."""
import asyncio

import pytest

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.rpc.convert import sampling_to_pb
from common.rpc.generated.specd.v1 import common_pb2, draft_pb2
from common.speculative.params import SamplingParams
from draft_service.drafter import Drafter
from draft_service.servicer import DraftServicer
from tests.checkpoints import build_model_folder


@pytest.fixture()
def drafter(tmp_path):
    folder = build_model_folder(tmp_path / "draft", seed=3)
    d = Drafter(ModelRunner(EngineConfig(model=str(folder), dtype="float32", num_kv_blocks=64, max_num_seqs=4)))
    yield d
    d.shutdown()


def test_propose_drafts_with_the_callers_prompt_len(drafter):
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    # this model's own greedy continuation of [3, 1, 4] repeats one token: penalised as output, it is avoided
    context = [3, 1, 4] + drafter.propose("greedy", [3, 1, 4], 8, SamplingParams(), 0, timeout=30).proposal.token_ids
    servicer = DraftServicer(drafter, common_pb2.ModelInfo())
    propose = lambda prompt_len: asyncio.run(servicer.Propose(draft_pb2.ProposeRequest(
        request_id="pl", context_token_ids=context, k=6, sampling=sampling_to_pb(params), prompt_len=prompt_len),
        None)).token_ids
    drafted = {}
    for prompt_len in (3, len(context)):
        direct = drafter.propose("direct", context, 6, params, 0, timeout=30, prompt_len=prompt_len)
        drafted[prompt_len] = list(propose(prompt_len))
        assert drafted[prompt_len] == direct.proposal.token_ids
    assert drafted[3] != drafted[len(context)]                 # prompt_len mattered, so it was carried
