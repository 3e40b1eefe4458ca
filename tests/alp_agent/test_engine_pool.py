"""Engines outside the trainer's process and pools of them, on the real vLLM (tiny random model, float32):
a process engine samples exactly what the in-process engine samples, weights reach every engine of a pool through
shared memory, and a rollout spreads GRPO groups over the engines. Plus the placement arithmetic (no vLLM)."""

from __future__ import annotations

import asyncio
import os
import signal
import zlib

import pytest
import torch

from alp_agent.engine.base import SamplingConfig
from alp_agent.engine.config import EngineConfig
from alp_agent.engine.factory import engine_envs
from alp_agent.engine.shared_weights import SharedWeights
from tests.fakes import ScriptedEnv

PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198], list(range(100, 130)), [7, 8, 9]]


# ------------------------------------------------------------------ no vLLM: placement and shared buffers
def test_engine_envs_split_gpus_and_cores():
    two = EngineConfig(num_engines=2, placement="process")
    assert engine_envs(two, cuda=False, cores=[0, 1, 2, 3, 4]) == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0,1"},
        {"VLLM_CPU_OMP_THREADS_BIND": "2,3"},
    ]
    assert engine_envs(two, cuda=False, cores=[0]) == [{}, {}]  # fewer cores than engines: all share
    assert engine_envs(two.model_copy(update={"cpu_threads_bind": "0"}), cuda=False, cores=[0, 1]) == [{}, {}]
    assert engine_envs(two, cuda=True, gpus=["0", "1", "2", "3"]) == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ]
    # engines on the last four of eight GPUs, two GPUs each; the parent's CUDA_VISIBLE_DEVICES maps the indices
    tp = EngineConfig(num_engines=2, placement="process", tensor_parallel_size=2, devices=[4, 5, 6, 7])
    assert engine_envs(tp, cuda=True, gpus=[str(g) for g in range(10, 18)]) == [
        {"CUDA_VISIBLE_DEVICES": "14,15"},
        {"CUDA_VISIBLE_DEVICES": "16,17"},
    ]
    assert engine_envs(EngineConfig(placement="process"), cuda=True, gpus=["0"]) == [{}]  # shares the GPU
    with pytest.raises(ValueError, match="needs 2 of the 1 visible"):
        engine_envs(two, cuda=True, gpus=["0"])


def test_engine_config_rejects_impossible_placements():
    with pytest.raises(ValueError, match="placement: process"):
        EngineConfig(num_engines=2)
    with pytest.raises(ValueError, match="needs 4"):
        EngineConfig(num_engines=2, placement="process", tensor_parallel_size=2, devices=[0, 1, 2])


def test_shared_weights_cast_fill_and_layout():
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5), "steps": torch.tensor([7, 8])}
    w = SharedWeights.for_state_dict(sd, torch.bfloat16)
    assert set(w.buffers) == {torch.bfloat16, torch.int64}  # one flat buffer per dtype
    assert all(b.is_shared() for b in w.buffers.values())
    w.fill(sd)
    v = w.views()
    assert v["a"].dtype == torch.bfloat16 and torch.equal(v["a"], sd["a"].to(torch.bfloat16))
    assert torch.equal(v["steps"], sd["steps"]) and v["b"].shape == (5,)
    assert w.matches(sd) and not w.matches({"a": sd["a"]})
    assert w.nbytes == (12 + 5) * 2 + 2 * 8


# ------------------------------------------------------------------ the real vLLM
@pytest.fixture(scope="module")
def pool(tiny_model_dir):
    """Two process engines (one core each on a 2-core machine) behind an EnginePool, group routing."""
    from alp_agent.engine.factory import make_engine

    eng = make_engine(
        EngineConfig(
            model=tiny_model_dir, dtype="float32", max_model_len=512, placement="process", num_engines=2, seed=0
        )
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_state(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()


def _same(gens_a, gens_b, tol=1e-4) -> None:
    for a, b in zip(gens_a, gens_b, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < tol


@pytest.mark.vllm
@pytest.mark.slow
def test_process_engine_samples_like_the_inprocess_engine(pool, tiny_vllm_engine):
    from alp_agent.engine.remote import ProcessEngine

    assert [type(e) for e in pool.engines] == [ProcessEngine, ProcessEngine]
    assert len({e.pid for e in pool.engines} | {os.getpid()}) == 3  # really two other processes
    for s in (SamplingConfig(temperature=0.0, max_tokens=12), SamplingConfig(temperature=1.0, max_tokens=12, seed=3)):
        ref = tiny_vllm_engine.generate(PROMPTS, s)
        for member in pool.engines:
            _same(member.generate(PROMPTS, s), ref)
        _same(pool.generate(PROMPTS, s), ref)  # the pool deals prompts round-robin and keeps their order
    # each child releases its own KV cache (1 GiB) and samples the same afterwards
    assert pool.release_kv_cache() > 2 * 0.99 * 2**30
    _same(pool.generate(PROMPTS, s), ref)
    # request errors cross the process boundary as the same exception type
    with pytest.raises(ValueError, match="max_model_len"):
        pool.engines[0].generate([list(range(600))], SamplingConfig(max_tokens=4))


@pytest.mark.vllm
@pytest.mark.slow
def test_pool_load_weights_reaches_every_engine_identically(pool, tiny_vllm_engine, hf_state):
    s = SamplingConfig(temperature=0.0, max_tokens=12)
    before = tiny_vllm_engine.generate(PROMPTS, s)
    torch.manual_seed(0)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in hf_state.items()}
    try:
        pool.load_weights(moved)
        tiny_vllm_engine.load_weights(moved)
        ref = tiny_vllm_engine.generate(PROMPTS, s)
        assert [g.token_ids for g in ref] != [g.token_ids for g in before]  # the new weights change the outputs...
        for member in pool.engines:
            _same(member.generate(PROMPTS, s), ref)  # ...of every engine, identically
        assert pool._weights is not None and pool._weights.nbytes == sum(v.numel() * 4 for v in moved.values())
    finally:
        pool.load_weights(hf_state)
        tiny_vllm_engine.load_weights(hf_state)
    for member in pool.engines:
        _same(member.generate(PROMPTS, s), before)


def _two_turn_env() -> ScriptedEnv:
    """Scripted env: a tool observation after the first turn, reward 1 after the second."""
    return ScriptedEnv(2, stop=None, system=None, observation="42")


@pytest.mark.vllm
@pytest.mark.slow
def test_rollout_spreads_groups_over_the_pool(pool, tiny_tokenizer):
    from alp_agent.rollout.config import RolloutConfig
    from alp_agent.rollout.runner import RolloutRunner

    cfg = RolloutConfig(max_tokens_per_turn=8, on_turn_limit="continue", max_turns=2, seed=0, temperature=1.0)
    runner = RolloutRunner(pool, tiny_tokenizer, _two_turn_env, cfg)
    start = list(pool.requests)
    trajs = runner.run([0, 1, 2, 3], n_per_task=2)
    served = [b - a for a, b in zip(start, pool.requests)]
    # group routing: group g on engine g % 2, every turn of it
    assert served == [sum(t.num_turns for t in trajs if t.group_id % 2 == i) for i in range(2)]
    assert all(n > 0 for n in served) and all(t.num_turns == 2 for t in trajs)
    pool.routing = "least_loaded"
    try:
        start = list(pool.requests)
        runner.run([0, 1, 2, 3], n_per_task=2)
        assert all(b > a for a, b in zip(start, pool.requests))
    finally:
        pool.routing = "group"


def _one_turn_env() -> ScriptedEnv:
    """One model turn; reward = parity of the text's CRC (varies between samples, so updates move the weights)."""
    return ScriptedEnv(
        1, stop=None, system=None, question="say something", reward=lambda t: float(zlib.crc32(t.encode()) % 2)
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_async_training_on_the_pool_records_the_true_version(pool, tiny_model_dir, tiny_tokenizer, hf_state):
    """Async rollout on two vLLM processes: every trajectory's logprobs are those of the trainer's weights at the
    version it records (and not of the next one), staleness is [0, 1, 1], and the pool ends with the final weights."""
    from alp_agent.algo.config import TrainerConfig
    from alp_agent.models import load_model
    from alp_agent.rollout.config import RolloutConfig
    from alp_agent.rollout.runner import RolloutRunner
    from alp_agent.train.logprobs import sequence_logprobs
    from alp_agent.train.loop import LoopConfig, LoopHooks, run_training
    from alp_agent.train.trainer import Trainer

    model = load_model(tiny_model_dir)
    # every turn here is cut at 8 tokens (void): keep them in the loss so the weights move between versions
    cfg = TrainerConfig.model_validate(
        {"optim": {"lr": 5e-2}, "update": {"updates_per_batch": 1}, "algo": {"mask_void_turns": False}}
    )
    trainer = Trainer(model, cfg)
    snapshots = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    sampled: list = []
    hooks = LoopHooks(
        after_rollout=lambda b, trajs: sampled.extend(trajs),
        after_batch=lambda b, m: snapshots.__setitem__(
            trainer.policy_version, {k: v.clone() for k, v in model.state_dict().items()}
        ),
    )
    runner = RolloutRunner(
        pool,
        tiny_tokenizer,
        _one_turn_env,
        RolloutConfig(max_tokens_per_turn=8, max_turns=1, seed=0, temperature=1.0, on_turn_limit="continue"),
    )
    try:
        loop = LoopConfig(num_tasks=4, num_batches=3, prompts_per_batch=2, n_per_task=4, async_rollout=True)
        hist = run_training(trainer, runner, pool, loop, hooks)
        assert [h["staleness/max"] for h in hist] == [0, 1, 1]
        assert sorted({t.policy_version for t in sampled}) == [0, 1]
        check = load_model(tiny_model_dir).eval()

        def logprobs_at(version: int, t) -> torch.Tensor:
            check.load_state_dict(snapshots[version])
            with torch.no_grad():
                lp, _ = sequence_logprobs(check, torch.tensor([t.ids]))
            return lp[0, len(t.prompt_ids) :]

        for t in sampled:
            infer = torch.tensor(t.infer_logprobs)
            own = (logprobs_at(t.policy_version, t) - infer).abs().max()
            nxt = (logprobs_at(t.policy_version + 1, t) - infer).abs().max()
            assert own < 1e-4 and nxt > 1e-2, (own, nxt)  # its own version, not the next one
        # after the loop every engine holds the final weights
        t = sampled[-1]
        prompt = t.ids[: len(t.prompt_ids)]
        for member in pool.engines:
            g = member.generate([prompt], SamplingConfig(temperature=1.0, max_tokens=8, seed=0))[0]
            check.load_state_dict(snapshots[3])
            with torch.no_grad():
                lp, _ = sequence_logprobs(check, torch.tensor([prompt + g.token_ids]))
            assert torch.allclose(lp[0, len(prompt) :], torch.tensor(g.logprobs), atol=1e-3)
    finally:
        runner.close()
        pool.load_weights(hf_state)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_dead_engine_process_fails_requests_instead_of_hanging(pool):
    """Last in the module: it kills one member of the shared pool."""
    from alp_agent.engine.remote import EngineProcessError

    victim = pool.engines[1]

    async def long_request():
        return await victim.agenerate(PROMPTS[0], SamplingConfig(max_tokens=400, seed=0))

    async def main():
        task = asyncio.ensure_future(long_request())
        await asyncio.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        return await asyncio.wait_for(task, 60)

    with pytest.raises(EngineProcessError):
        asyncio.run(main())
    with pytest.raises(EngineProcessError):
        victim.generate([PROMPTS[0]], SamplingConfig(max_tokens=2))
