"""The step loop: schedule, run, postprocess; plus request validation and `generate`.

Rank 0 owns the scheduler and the tokenizer; with tensor_parallel_size=N it starts N-1 worker ranks through
the control plane and mirrors every runner call to them.
"""
from __future__ import annotations

import atexit
import logging
import time
from typing import Any

from tqdm.auto import tqdm

from nanovllm_lab.config import Config
from nanovllm_lab.distributed.control import ControlPlane, PipeControlPlane, WorkerDiedError
from nanovllm_lab.engine.inputs import prepare_decode, prepare_prefill
from nanovllm_lab.engine.model_runner import ModelRunner
from nanovllm_lab.engine.overlap import OverlapDecoder
from nanovllm_lab.engine.scheduler import Scheduler
from nanovllm_lab.engine.sequence import Sequence
from nanovllm_lab.sampling_params import SamplingParams
from nanovllm_lab.utils.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self._closed = True
        config = Config.from_kwargs(model, **kwargs).resolve()
        self.config = config
        self.tokenizer = load_tokenizer(config.arch)
        tp = config.tensor_parallel_size
        # single_rank: rank 0 of the tp-way shard runs alone (Config.single_rank), no workers
        spawn = tp > 1 and not config.single_rank
        self.control: ControlPlane = PipeControlPlane(config, tp) if spawn else ControlPlane()
        self._closed = False
        atexit.register(self.exit)
        try:
            self.control.wait_booted(120.0)
            self.model_runner = ModelRunner(config, 0, self.control.init_file)
            self.control.wait_ready(600.0)
            if config.device.startswith("cuda") and isinstance(self.control, PipeControlPlane):
                self.control.on_death = _abort_nccl
        except BaseException:
            self.exit()
            raise
        self.valid_outputs = self.model_runner.strategy.valid_outputs
        max_blocks = self.model_runner.num_kvcache_blocks
        if max_blocks * config.kvcache_block_size < config.max_model_len:
            log.warning("KV cache holds %d tokens, fewer than max_model_len=%d; capping max_model_len",
                        max_blocks * config.kvcache_block_size, config.max_model_len)
            config.max_model_len = max_blocks * config.kvcache_block_size
        self.overlap = OverlapDecoder(self)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, set(config.arch.eos_token_ids),
                                   max_blocks, config.kvcache_block_size)

    # -- requests ------------------------------------------------------------------------------------
    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError("a prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.config.arch.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return ids

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        _check_params(sampling_params)  # before tokenizing: the cheaper error first
        ids = self._tokenize(prompt)
        self._check_length(ids, sampling_params)
        return self._add(ids, sampling_params)

    def _check_length(self, ids: list[int], sampling_params: SamplingParams) -> None:
        if len(ids) + sampling_params.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_tokens={sampling_params.max_tokens} exceeds "
                             f"max_model_len={self.config.max_model_len}")

    def _add(self, ids: list[int], sampling_params: SamplingParams) -> int:
        """Queue ids that _tokenize, _check_params and _check_length accepted."""
        seq = Sequence(ids, sampling_params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq.seq_id

    # -- the loop --------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any):
        """Run a runner method on every rank (workers first, so collectives line up)."""
        self.control.call(method, *args)
        try:
            return getattr(self.model_runner, method)(*args)
        except WorkerDiedError:
            raise
        except Exception:
            self.control.check()  # a dead peer is the real cause: name its rank
            raise

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """One scheduled step. Returns finished (seq_id, completion ids) and the tokens processed
        (positive for prefill, minus the number of sequences for decode)."""
        done: list[tuple[int, list[int]]] = []
        if self.overlap.inflight is not None:  # a decode step is running: queue the next, then collect it
            if self.overlap.can_continue():
                return self.overlap.step()
            done = self.overlap.drain()  # a prompt waits, a preemption is due, or nothing is left
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return done, 0
        bs = self.config.kvcache_block_size
        step = prepare_prefill(seqs, bs) if is_prefill else prepare_decode(seqs, bs)
        if self.overlap.applies(seqs, is_prefill):
            self.overlap.start(seqs, step)
            return done, -len(seqs)
        token_ids: list[int | None] = list(self._call("run", step))
        if is_prefill:  # a chunk that stops short of the prompt's end samples nothing
            token_ids = [t if s.num_cached_tokens + s.num_scheduled_tokens == s.num_tokens else None
                         for s, t in zip(seqs, token_ids)]
        finished = self.scheduler.postprocess(seqs, token_ids)
        n = step.num_tokens if is_prefill else -len(seqs)
        return done + [(s.seq_id, s.completion_token_ids) for s in finished], n

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.overlap.inflight is None

    def generate(self, prompts: list[str] | list[list[int]], sampling_params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[dict]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("generate takes a list of prompts (strings or lists of token ids)")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} SamplingParams")
        ids = [self._tokenize(p) for p in prompts]  # validate everything before queueing anything
        for i, sp in zip(ids, sampling_params):
            _check_params(sp)
            self._check_length(i, sp)
        seq_ids = [self._add(i, sp) for i, sp in zip(ids, sampling_params)]
        outputs: dict[int, list[int]] = {}
        bar = tqdm(total=len(prompts), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        while not self.is_finished():
            t = time.perf_counter()
            finished, n = self.step()
            dt = max(time.perf_counter() - t, 1e-9)
            if n > 0:
                prefill_tps = n / dt
            elif n < 0:
                decode_tps = -n / dt
            bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
            for seq_id, toks in finished:
                outputs[seq_id] = toks
                bar.update(1)
        bar.close()
        self.model_runner.strategy.check()  # a reduction that went wrong on the device fails the call, not silently
        results = []
        for sid in seq_ids:
            toks = outputs[sid]
            if not self.valid_outputs:  # the `none` strategy's tokens are wrong by design: no text from them
                results.append({"text": None, "token_ids": toks, "valid": False})
            else:
                text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
                results.append({"text": text, "token_ids": toks})
        return results

    def exit(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self.exit)
        except Exception:
            pass
        self.control.close()
        runner = getattr(self, "model_runner", None)
        if runner is not None:
            runner.shutdown()


def _check_params(sampling_params: SamplingParams) -> None:
    if not isinstance(sampling_params, SamplingParams):
        raise TypeError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")


def _abort_nccl(rank: int) -> None:
    """Unblock rank 0 if it waits in an NCCL collective for a dead worker: NCCL, unlike gloo, does not notice a
    vanished peer until its timeout. The aborted collective raises; the engine then names the dead rank."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception as e:  # experimental API; the worst case is the NCCL timeout
        log.warning("could not abort NCCL after worker rank %d died: %s", rank, e)
