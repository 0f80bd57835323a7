"""The user-facing facade: `LLM(model, **config).generate(prompts, sampling_params)`."""
from __future__ import annotations

from nanovllm_lab.engine.llm_engine import LLMEngine


class LLM(LLMEngine):
    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.exit()
