"""End to end on loopback: verifier (TP=2, gloo), draft and gateway as three real processes, tiny checkpoints.

Every result is compared with the in-process twin (common.llm.LLM) on the same checkpoints.
"""
import concurrent.futures as cf

import grpc
import pytest

from common.distributed import free_port
from common.llm import LLM
from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from common.speculative.params import SamplingParams
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import WORD_CHAT_TEMPLATE, build_model_folder, perturbed_copy

PROMPTS = [[5, 9, 2, 77, 31], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4], [100, 3]]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    target = build_model_folder(root / "target", seed=21, chat_template=WORD_CHAT_TEMPLATE)
    return str(target), str(perturbed_copy(target, root / "draft", noise=0.05))   # agrees often, not always


@pytest.fixture(scope="module")
def twin(models):
    with LLM(models[0], models[1], num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        yield llm


@pytest.fixture(scope="module")
def topo(models, tmp_path_factory):
    ports = (free_port(), free_port(), free_port())
    t = LocalTopology(models[0], models[1], tp=2, dtype="float32", ports=ports, k="3",
                      log_dir=tmp_path_factory.mktemp("logs"))
    t.start(timeout_s=180)
    yield t
    t.stop()


@pytest.fixture()
def client(topo):
    with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=120) as c:
        yield c


def test_greedy_through_the_gateway_equals_in_process_target_only(client, twin):
    expected = [o.token_ids for o in twin.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                                                   proposer=None)]
    for prompt, exp in zip(PROMPTS, expected):
        reply = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert list(reply.token_ids) == exp
        assert reply.finish_reason == "length" and reply.stats.drafted > 0
        assert 0 < reply.stats.accepted and reply.stats.rounds < MAX_TOKENS      # speculation really paid off
        s = reply.stats
        assert 0 < s.verify_compute_ms < s.verify_ms and 0 < s.draft_compute_ms < s.draft_ms
        assert s.wire_bytes > 4 * s.rounds * len(prompt)                        # each round sends the context


def test_stream_yields_the_same_tokens_incrementally(client):
    whole = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, ignore_eos=True)
    chunks = list(client.stream(PROMPTS[1], max_tokens=MAX_TOKENS, ignore_eos=True))
    assert len(chunks) > 1 and chunks[-1].finish_reason == "length"
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].stats.rounds == whole.stats.rounds


def test_seeded_sampling_equals_the_in_process_speculative_output(client, twin):
    for seed in (1, 2):
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_TOKENS, seed=seed, ignore_eos=True)
        [expected] = twin.generate([PROMPTS[0]], params, num_speculative_tokens=3, proposer="draft")
        reply = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=seed,
                                ignore_eos=True, num_speculative_tokens=3)
        assert list(reply.token_ids) == expected.token_ids


def test_a_conversation_equals_in_process_on_its_rendered_prompt(client, twin):
    conversation = [{"role": "system", "content": "<w9>"}, {"role": "user", "content": "<w10><w11>"},
                    {"role": "assistant", "content": "<w20>"}, {"role": "user", "content": "<w13>"}]
    ids = twin.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    [expected] = twin.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), proposer=None)
    reply = client.generate(conversation, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert list(reply.token_ids) == expected.token_ids and reply.prompt_tokens == len(ids)


def test_n_completions_each_draw_from_seed_plus_i(client, twin):
    reply = client.generate(PROMPTS[0], max_tokens=12, temperature=1.0, seed=5, n=3, ignore_eos=True,
                            num_speculative_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1, 2] and list(reply.token_ids) == list(reply.choices[0].token_ids)
    for i, c in enumerate(reply.choices):
        [expected] = twin.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12,
                                                                ignore_eos=True), num_speculative_tokens=3,
                                   proposer="draft")
        assert list(c.token_ids) == expected.token_ids and c.finish_reason == "length"
    assert len({tuple(c.token_ids) for c in reply.choices}) > 1
    chunks = list(client.stream(PROMPTS[0], max_tokens=12, temperature=1.0, seed=5, n=3, ignore_eos=True,
                                num_speculative_tokens=3))
    for c in reply.choices:                     # streamed: chunks interleaved, each completion whole by index
        mine = [ch for ch in chunks if ch.index == c.index]
        assert [t for ch in mine for t in ch.token_ids] == list(c.token_ids)
        assert mine[-1].finish_reason == "length" and mine[-1].stats.rounds == c.stats.rounds


def test_logprobs_are_the_targets_over_grpc(client, twin):
    [expected] = twin.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2),
                               proposer=None)
    reply = client.generate(PROMPTS[1], max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    assert reply.stats.accepted > 0 and len(reply.logprobs) == MAX_TOKENS
    for got, exp in zip(reply.logprobs, expected.logprobs):
        assert got.token_id == exp.token_id and got.logprob == pytest.approx(exp.logprob, abs=1e-4)
        assert list(got.top_token_ids) == [i for i, _ in exp.top]
        assert list(got.top_logprobs) == pytest.approx([lp for _, lp in exp.top], abs=1e-4)


def test_eight_concurrent_streams_equal_sequential_requests_and_are_batched(client):
    prompts = [[i + 1, 40 + i, 7] for i in range(8)]
    sequential = [list(client.generate(p, max_tokens=16, ignore_eos=True).token_ids) for p in prompts]

    def streamed(p):
        chunks = list(client.stream(p, max_tokens=16, ignore_eos=True))
        return [t for c in chunks for t in c.token_ids], chunks[-1].stats.max_verify_batch_size

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(streamed, prompts))
    assert [tokens for tokens, _ in results] == sequential
    assert max(batch for _, batch in results) > 1            # rounds of different requests shared a forward pass


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="   "), "prompt: empty"),
    (dict(prompt=[1] * 300), "context limit"),
    (dict(prompt=[1, 2], max_tokens=40000), "max_tokens=40000"),
    (dict(prompt=[1, 2], temperature=-1.0), "temperature"),
    (dict(prompt=[1, 2], temperature=1.0, top_p=1.5), "top_p"),
    (dict(prompt=[1, 2], top_k=-2), "top_k"),
    (dict(prompt=[1, 900]), "outside the vocabulary"),
    (dict(prompt=[1, 2], num_speculative_tokens=99), "num_speculative_tokens=99"),
])
def test_bad_input_is_invalid_argument_naming_the_field(client, kwargs, field):
    prompt = kwargs.pop("prompt")
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    assert len(client.generate([1, 2], max_tokens=2).token_ids) == 2        # still serving


def test_verifier_status_codes_and_idempotent_retry(topo):
    with grpc.insecure_channel(f"127.0.0.1:{topo.verifier_port}") as ch:
        stub = verifier_pb2_grpc.VerifierServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Verify(verifier_pb2.VerifyRequest(session_id="ghost", round=4, committed_len=9, new_tokens=[1]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        first = stub.Verify(verifier_pb2.VerifyRequest(session_id="idem", round=0, committed_len=3,
                                                       new_tokens=[4, 5, 6], draft_token_ids=[7, 8]))
        again = stub.Verify(verifier_pb2.VerifyRequest(session_id="idem", round=0, committed_len=3,
                                                       new_tokens=[4, 5, 6], draft_token_ids=[7, 8]))
        assert again == first and first.rollback.truncate_to == 3 + len(first.accepted_token_ids)
        with pytest.raises(grpc.RpcError) as e:
            stub.Verify(verifier_pb2.VerifyRequest(session_id="idem", round=7, committed_len=10, new_tokens=[1]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "expects round 1" in e.value.details()
        assert stub.Release(verifier_pb2.ReleaseRequest(session_id="idem")).released
        info = stub.Info(common_pb2.InfoRequest())
        assert info.tp_size == 2 and info.vocab_size == 128


def test_draft_killed_mid_request_falls_back_and_speculation_resumes(topo, client, twin):
    [expected] = twin.generate([PROMPTS[2]], SamplingParams(max_tokens=48, ignore_eos=True), proposer=None)
    stream = client.stream(PROMPTS[2], max_tokens=48, ignore_eos=True)
    tokens = list(next(stream).token_ids)
    topo.kill("draft")                                                  # SIGKILL mid-request
    for chunk in stream:
        tokens += chunk.token_ids
        last = chunk
    assert tokens == expected.token_ids and last.stats.fallback_rounds >= 1
    topo.start_draft()
    topo.wait_serving(f"127.0.0.1:{topo.draft_port}", "draft", 120)
    import time
    time.sleep(2.5)                                                      # past the gateway's retry pause
    reply = client.generate(PROMPTS[2], max_tokens=24, ignore_eos=True)
    assert reply.stats.drafted > 0 and list(reply.token_ids) == expected.token_ids[:24]


def test_health_command_against_the_running_services(topo, capsys):
    from scripts.cli import main
    for port in (topo.gateway_port, topo.draft_port, topo.verifier_port):
        assert main(["health", "--insecure", f"127.0.0.1:{port}"]) == 0
    assert "SERVING" in capsys.readouterr().out
