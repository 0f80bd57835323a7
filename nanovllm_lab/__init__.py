"""nanovllm_lab: a compact nano-vLLM-architecture inference engine and a lab for compute/communication
overlap in tensor-parallel inference.

    from nanovllm_lab import LLM, SamplingParams
    llm = LLM("tiny")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""
from nanovllm_lab.config import Config
from nanovllm_lab.llm import LLM
from nanovllm_lab.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "Config"]
