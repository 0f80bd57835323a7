"""A request's state as it moves through the scheduler: tokens, KV blocks, progress."""
from __future__ import annotations

from enum import Enum, auto
from itertools import count

from nanovllm_lab.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()   # not (fully) prefilled: new, mid chunked prefill, or preempted
    RUNNING = auto()   # prefilled, decoding
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then completion) and the KV blocks that hold them.

    `num_cached_tokens` counts tokens whose K/V already sit in the cache (prefix hits plus computed chunks);
    `num_scheduled_tokens` is how many the current step computes.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.block_size = block_size
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_hashed_blocks = 0
        self.block_table: list[int] = []
        self.temperature = float(sampling_params.temperature)
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
