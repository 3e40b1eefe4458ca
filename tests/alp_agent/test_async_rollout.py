"""run_training with asynchronous rollout (batch k+1 sampled while the trainer updates on batch k): weights reach the
sampler only between rollouts, every trajectory carries the true version of the weights that sampled it, staleness
follows the bound exactly, the engine ends with the final weights, and training still learns. Synchronous mode keeps
staleness 0. A tiny torch model is the sampler here (fast); test_engine_pool.py runs the same loop on real vLLM."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from test_trainer import tiny  # the same tiny Llama as the trainer tests

from alp_agent.algo.config import TrainerConfig
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.loop import FunctionSampler, LoopConfig, run_training
from alp_agent.train.trainer import Trainer

PROMPT, LENGTH = 3, 6


class CopyEngine:
    """A sampler with its own copy of the weights (as vLLM has): `load_weights` copies them in and records which
    trainer version they are; it fails the test if a rollout is running at that moment."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.model = copy.deepcopy(trainer.model).eval()
        self.version = trainer.policy_version
        self.busy = 0
        self.loads: list[int] = []
        self.releases: list[int] = []  # the trainer's version at each release_kv_cache call
        self.lock = threading.Lock()

    def release_kv_cache(self) -> int:
        with self.lock:
            assert self.busy == 0, "KV cache released while a rollout was sampling"
            self.releases.append(self.trainer.policy_version)
        return 2**30

    def load_weights(self, sd) -> None:
        with self.lock:
            assert self.busy == 0, "weights loaded while a rollout was sampling"
            self.model.load_state_dict(sd)
            self.version = self.trainer.policy_version
            self.loads.append(self.version)

    def rollout(self, tasks: list[int], n: int, version: int) -> list[Trajectory]:
        """Reward = fraction of even token ids (chance 0.5); records the engine's version before and after."""
        with self.lock:
            self.busy += 1
            start = self.version
        try:
            time.sleep(0.01)  # let the trainer's update run meanwhile
            g = torch.Generator().manual_seed(1000 * version + len(self.loads))
            ids = torch.tensor([[3 + t, 10 + t, 20 + t] for t in tasks for _ in range(n)])
            lps = []
            with torch.no_grad():
                for _ in range(LENGTH):
                    logp = torch.log_softmax(self.model(input_ids=ids).logits[:, -1].float(), -1)
                    nxt = torch.multinomial(logp.exp(), 1, generator=g)
                    lps.append(logp.gather(-1, nxt))
                    ids = torch.cat([ids, nxt], 1)
            lps = torch.cat(lps, 1)
        finally:
            with self.lock:
                self.busy -= 1
                end = self.version
        assert start == end == version, (start, end, version)  # the recorded version is the one that sampled
        return [
            Trajectory(
                seq[:PROMPT],
                seq[PROMPT:],
                [1] * LENGTH,
                lp,
                reward=sum(x % 2 == 0 for x in seq[PROMPT:]) / LENGTH,
                group_id=row // n,
                policy_version=version,
            )
            for row, (seq, lp) in enumerate(zip(ids.tolist(), lps.tolist()))
        ]


def _train(batches: int, **kw) -> tuple[Trainer, CopyEngine, list[dict]]:
    cfg = TrainerConfig.model_validate(
        {
            "optim": {"lr": 1e-2},
            "update": {"updates_per_batch": 2, "micro_batch_tokens": 512},
            "algo": {"perturb": {"sigma0": 0.05, "sigma_lr": 0.05}},
        }
    )
    tr = Trainer(tiny(1), cfg)
    eng = CopyEngine(tr)
    hist = run_training(tr, FunctionSampler(eng.rollout), eng, LoopConfig(8, batches, 8, 8, **kw))
    return tr, eng, hist


@pytest.mark.parametrize(("bound", "expected"), [(1, [0, 1, 1, 1, 1]), (2, [0, 1, 2, 1, 2])])
def test_async_staleness_follows_the_bound_and_versions_are_true(bound, expected):
    tr, eng, hist = _train(5, async_rollout=True, max_staleness=bound)
    assert [h["staleness/max"] for h in hist] == expected
    assert [h["staleness/mean"] for h in hist] == expected  # one version per batch: mean == max
    assert all(h["time/rollout_wait"] >= 0 for h in hist)
    # fewer syncs with a looser bound; the engine always ends with the final weights
    assert eng.loads == ([1, 2, 3, 5] if bound == 1 else [2, 5])  # version 4 sampled nothing
    assert eng.version == tr.policy_version == 5
    for k, v in tr.model.state_dict().items():
        assert torch.equal(eng.model.state_dict()[k], v)


def test_sync_mode_is_unchanged():
    _, eng, hist = _train(3)
    assert [h["staleness/max"] for h in hist] == [0, 0, 0] and eng.loads == [1, 2, 3]
    assert "time/rollout_wait" not in hist[0]


def test_kv_cache_is_released_before_each_synchronous_update_only():
    """engine.release_kv_cache: once per batch, after its rollout and before its update (version not yet bumped). In
    async mode only before the last update: before the others the next batch is already sampling."""
    _, eng, hist = _train(3, release_kv_cache=True)
    assert eng.releases == [0, 1, 2] and eng.loads == [1, 2, 3]
    assert [h["engine/kv_released_gib"] for h in hist] == [1.0, 1.0, 1.0]
    _, eng, hist = _train(3, release_kv_cache=True, async_rollout=True)
    assert eng.releases == [2] and "engine/kv_released_gib" not in hist[0]


def test_async_needs_an_engine():
    tr = Trainer(tiny(1), TrainerConfig())
    with pytest.raises(ValueError, match="async_rollout"):
        run_training(tr, FunctionSampler(lambda *a: []), None, LoopConfig(4, 1, 1, 1, async_rollout=True))


@pytest.mark.slow
def test_async_training_still_learns():
    """The task of test_trainer's real loop, one version stale: the reward still climbs from chance."""
    _, _, hist = _train(15, async_rollout=True, max_staleness=1)
    first = sum(h["reward/mean"] for h in hist[:2]) / 2
    last = sum(h["reward/mean"] for h in hist[-2:]) / 2
    assert first < 0.65 and last > 0.85, (first, last)


@pytest.mark.vllm
@pytest.mark.slow
def test_cli_train_with_a_process_engine_and_async_rollout(tiny_model_dir, tmp_path):
    """The job's wiring: `alp-agent train` with vLLM in a child process and async rollout on the quickstart env
    (sandboxed tool calls): finishes, logs staleness 0 then 1, evaluates after training with the final weights."""
    import json
    from pathlib import Path

    from alp_agent.app.cli import main
    from tests.alp_agent.test_cli import _small

    repo = Path(__file__).resolve().parents[2]
    args = [
        *_small(tiny_model_dir, tmp_path, "async"),
        "engine.placement=process",
        "run.async_rollout=true",
        "run.iterations=2",
        "run.checkpoint_every=0",
    ]
    assert main(["train", "-c", str(repo / "configs/quickstart.yaml"), "--quiet", *args]) == 0
    records = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "batch"]
    assert [b["staleness/max"] for b in batches] == [0.0, 1.0]
    summary = json.loads((tmp_path / "async" / "summary.json").read_text())
    assert summary["batches"] == 2 and summary["accuracy_after"] is not None
