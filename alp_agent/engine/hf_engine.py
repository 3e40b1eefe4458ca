"""HFEngine: transformers `generate` behind the Engine interface.

Why it exists: platforms without vLLM, and the reference in parity tests. It is slow (one prompt at a time, so that
no padding token can be mistaken for a generated EOS: SmolLM2's pad id *is* its EOS id) but simple and exact.

Logprobs come from `alp_agent.train.logprobs.logprobs_from_logits` applied to the *processed* scores `generate` sampled
from (after temperature, top-k, top-p), so they mean what vLLM's `processed_logprobs` mean. Greedy decoding
(temperature 0) reports logprobs at temperature 1.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from alp_agent.engine.base import Engine, Generation, SamplingConfig
from alp_agent.engine.checks import check_logprobs
from alp_agent.engine.config import EngineConfig
from alp_agent.models import load_tokenizer, resolve_model
from alp_agent.train.logprobs import logprobs_from_logits

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": torch.float32}


class HFEngine(Engine):
    """`HFEngine(EngineConfig(model=..., dtype="float32"), device="cpu")` or keyword overrides like VLLMEngine.
    GPU-only fields of EngineConfig are ignored."""

    def __init__(self, config: EngineConfig | None = None, device: str | torch.device | None = None, **overrides):
        from transformers import AutoModelForCausalLM

        config = EngineConfig.model_validate({**(config or EngineConfig()).model_dump(), **overrides})
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_path = resolve_model(config.model)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=_DTYPES[config.dtype]).to(self.device)
        self.model.eval()
        self.tokenizer = load_tokenizer(self.model_path)
        self.max_model_len = config.max_model_len
        self._lock = threading.Lock()  # one generate at a time (agenerate runs in worker threads)
        self._seed = config.seed

    @torch.no_grad()
    def _generate_one(self, prompt: list[int], s: SamplingConfig) -> Generation:
        greedy = s.temperature <= 0
        kwargs = {
            "max_new_tokens": s.max_tokens,
            "do_sample": not greedy,
            "output_scores": True,
            "return_dict_in_generate": True,
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        }
        if not greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out.sequences[0, len(prompt) :]
        scores = torch.stack(out.scores, dim=1)[0]  # (T, V) processed logits the tokens were sampled from
        lps, _ = logprobs_from_logits(scores, new)
        token_ids = new.tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        finish, stop_reason = "length", None
        if token_ids and token_ids[-1] in eos_ids:
            finish = "stop"
        else:  # generate stops right after the token that completes a stop string
            for x in s.stop:
                if x in self.tokenizer.decode(token_ids[-(len(x) + 2) :], skip_special_tokens=False):
                    finish, stop_reason = "stop", x
                    break
        gen = Generation(
            token_ids=token_ids, logprobs=lps.float().tolist(), finish_reason=finish, stop_reason=stop_reason
        )
        return check_logprobs(gen, self.config.nonfinite_logprobs)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        with self._lock:
            return [self._generate_one(p, sampling) for p in prompts]

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        with self._lock, torch.no_grad():
            own = self.model.state_dict()
            unknown = [k for k in state_dict if k not in own]
            if unknown:
                raise KeyError(f"load_weights: unknown parameter names {unknown[:5]}")
            for k, v in state_dict.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))
