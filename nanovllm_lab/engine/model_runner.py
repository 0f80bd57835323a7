"""The model runner: one per tensor-parallel rank. Builds the model shard, sizes and binds the KV cache,
runs forward passes (eagerly or through captured CUDA graphs) and samples on rank 0.

Device-agnostic: on cuda the KV cache is sized from the free-memory budget, on cpu from
`num_kvcache_blocks` or `cpu_kvcache_bytes`. Rank 0 calls `run(step)`; worker ranks receive the same
calls through the control plane.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from nanovllm_lab.attention.base import get_backend
from nanovllm_lab.comm import build_strategy, set_comm
from nanovllm_lab.config import Config
from nanovllm_lab.distributed.parallel import destroy_distributed, init_distributed
from nanovllm_lab.engine.inputs import StepInput
from nanovllm_lab.engine.pending import Carry, Pending, StepTimer, step_range
from nanovllm_lab.layers.attention import Attention
from nanovllm_lab.layers.sampler import Sampler
from nanovllm_lab.models.qwen3 import Qwen3ForCausalLM, checkpoint_shapes
from nanovllm_lab.utils.compile import set_compile, set_elementwise_kernels
from nanovllm_lab.utils.context import AttentionContext, reset_context, set_context
from nanovllm_lab.utils.loader import load_dummy, load_safetensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """One forward step as the timing hooks see it (latency: device events on cuda, monotonic clock on cpu)."""

    phase: str          # "prefill" or "decode"
    num_seqs: int
    num_tokens: int
    latency_s: float
    cuda_graph: bool
    kv_tokens_read: int = 0  # cached and new K/V tokens the step's attention reads (memory-traffic accounting)
    host_s: float = 0.0      # host time to build and launch the step (pending.StepTimer)


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0, init_file: str | None = None) -> None:
        self.config = config
        self.rank = rank
        arch = config.arch
        self.info = init_distributed(rank, config.tensor_parallel_size, config.device, init_file,
                                     single_rank=config.single_rank and config.tensor_parallel_size > 1)
        try:
            self.device = torch.device(self.info.device)
            self.dtype = config.torch_dtype
            self.block_size = config.kvcache_block_size
            self.strategy = build_strategy(config.strategy, self.info)
            set_comm(self.strategy)
            set_compile(config.torch_compile)
            set_elementwise_kernels(config.elementwise_kernels)
            torch.manual_seed(config.seed)
            prev_dtype = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    self.model = Qwen3ForCausalLM(arch)
            finally:
                torch.set_default_dtype(prev_dtype)
            shapes = checkpoint_shapes(arch)
            if config.load_format == "dummy":
                load_dummy(self.model, shapes, config.seed, self.device)
            else:
                load_safetensors(self.model, arch.path, list(shapes))
            self.model.eval()
            self.backend = get_backend(config.attention_backend)
            self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
            for m in self.attn_layers:
                m.backend = self.backend
            self.sampler = Sampler()
            # Worker ranks sample too when decode steps may be overlapped: they need the sampled ids.
            self.samples = rank == 0 or config.async_scheduling
            self._last_tokens: torch.Tensor | None = None
            self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
            self.strategy.prepare(config.max_num_batched_tokens, arch.hidden_size, self.dtype)
            self.step_hooks: list[Callable[[StepRecord], None]] = []
            self.logits_log: list[torch.Tensor] | None = None  # set to [] to keep each step's logits (tests, analysis)
            self.num_kvcache_blocks = self._allocate_kv_cache()
            self.graphs = self.prefill_graphs = None
            if self.device.type == "cuda" and not config.enforce_eager:
                from nanovllm_lab.engine.cuda_graph import DecodeGraphs
                self.graphs = DecodeGraphs(self)
                if config.prefill_graphs > 0:
                    from nanovllm_lab.engine.prefill_graphs import PrefillGraphs
                    self.prefill_graphs = PrefillGraphs(self, config.prefill_graphs)
            if self.device.type == "cuda":
                self._warm_kernels()
        except BaseException:
            self.shutdown()  # leave no half-initialised process group behind
            raise

    # -- KV cache ------------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        a, tp = self.config.arch, self.config.tensor_parallel_size
        return 2 * a.num_hidden_layers * self.block_size * (a.num_key_value_heads // tp) * a.head_dim * self.dtype.itemsize

    @torch.inference_mode()
    def _warmup(self) -> None:
        """A full-size prefill without a cache, so the activation peak is known before the cache is sized."""
        c = self.config
        n = min(c.max_num_batched_tokens, c.max_model_len * c.max_num_seqs)
        seq_len = min(n, c.max_model_len)
        self._prefill_dummy([seq_len] * (n // seq_len) + ([n % seq_len] if n % seq_len else []))
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_kernels(self) -> None:
        """Compile now what the first steps of a run would otherwise compile mid-run, for ~1 s each (measured:
        a cold-cache qwen3-0.6b bench spent 1.6 s in its second prefill step, the first with cached context).

        - The attention kernels' paged-prefill variant: the start-up prefill above had no cached context, and
          the first prompt split across two steps (chunked prefill) or a prefix-cache hit needs it.
        - With torch.compile, which specialises sizes 0 and 1 even with dynamic shapes: the sampler at 1 and 2
          rows (on its own generator, so the run's random stream is untouched) and, where no decode graphs were
          captured, the layers at one token.
        - The Triton SiLU-and-mul's variant for 1024 rows and more (4 rows per program), on a scratch input of
          the MLP's width: the dummy steps here are smaller, and the start-up prefill is skipped when the KV
          cache size is given.
        """
        self._prefill_dummy([2], cached=1)
        if self.config.elementwise_kernels == "triton":
            from nanovllm_lab.kernels.silu_mul import silu_and_mul
            width = 2 * self.config.arch.intermediate_size // self.config.tensor_parallel_size
            silu_and_mul(torch.zeros(1024, width, dtype=self.dtype, device=self.device))
        if self.config.torch_compile:
            if self.samples:
                gen = torch.Generator(device=self.device).manual_seed(0)
                for b in (1, 2):
                    logits = torch.zeros(b, self.config.arch.vocab_size, dtype=self.dtype, device=self.device)
                    self.sampler(logits, torch.ones(b, device=self.device), gen)
            if self.graphs is None:
                self._prefill_dummy([1])
        torch.cuda.synchronize(self.device)

    def _prefill_dummy(self, lens: list[int], cached: int = 0) -> None:
        """One eager prefill of sequences of these lengths, writing no K/V (slots -1), outputs discarded. With
        `cached` > 0 each sequence also attends to that many earlier tokens, read from the scratch block (the
        cache's last, which the scheduler never hands out), so the paged attention path runs."""
        n = sum(lens)
        cq, ck = [0], [0]
        for x in lens:
            cq.append(cq[-1] + x)
            ck.append(ck[-1] + x + cached)
        tables = None
        if cached:
            width = (max(lens) + cached + self.block_size - 1) // self.block_size
            tables = torch.full((len(lens), width), self.num_kvcache_blocks, dtype=torch.int32)
        positions = torch.cat([torch.arange(cached, cached + x) for x in lens])
        step = StepInput(True, torch.zeros(n, dtype=torch.int64), positions, torch.full((n,), -1, dtype=torch.int32),
                         torch.zeros(len(lens)), cq, ck, None, tables)
        self._forward(step, step.to_context(self.device))

    def _allocate_kv_cache(self) -> int:
        c, a = self.config, self.config.arch
        block_bytes = self._block_bytes()
        if c.num_kvcache_blocks > 0:
            num_blocks = c.num_kvcache_blocks
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._warmup()
            free, total = torch.cuda.mem_get_info(self.device)
            stats = torch.cuda.memory_stats(self.device)
            peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
            budget = total * c.gpu_memory_utilization - (total - free) - (peak - current)
            num_blocks = int(budget) // block_bytes - 1
        else:
            num_blocks = c.cpu_kvcache_bytes // block_bytes - 1
        if self.info.world_size > 1 and not self.info.single_rank:  # every rank must agree on the block count
            t = torch.tensor([num_blocks], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num_blocks = int(t.item())
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache on {self.device} "
                               f"(gpu_memory_utilization={c.gpu_memory_utilization})")
        kv_heads = a.num_key_value_heads // c.tensor_parallel_size
        # One scratch block beyond what the scheduler sees: padding tokens write there (attention/base.py).
        self.kv_cache = torch.zeros(2, a.num_hidden_layers, num_blocks + 1, self.block_size, kv_heads, a.head_dim,
                                    dtype=self.dtype, device=self.device)
        for i, m in enumerate(self.attn_layers):
            m.k_cache, m.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB) on %s", num_blocks, self.block_size,
                 num_blocks * block_bytes / 2**20, self.device)
        return num_blocks

    # -- forward -------------------------------------------------------------------------------------
    def _forward(self, step: StepInput, ctx: AttentionContext, carry: Carry | None = None) -> torch.Tensor:
        """Hidden states of this step's tokens (eager), with the step's attention context installed."""
        set_context(ctx)
        try:
            # A copy when ids are patched: on cpu `.to` returns the step's own tensor, which the control plane
            # may share with the worker ranks (torch pickles cpu tensors through shared memory).
            ids = step.input_ids.to(self.device, non_blocking=True, copy=carry is not None)
            if carry is not None:
                carry.apply(ids)
            pos = step.positions.to(self.device, non_blocking=True)
            return self.model(ids, pos)
        finally:
            reset_context()

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[int] | None:
        """Run one step on this rank; rank 0 returns the sampled token of each sequence."""
        pending = self.launch(step)
        return None if pending is None else self.collect(pending)

    @torch.inference_mode()
    def launch(self, step: StepInput, carry_rows: tuple[list[int], list[int]] | None = None) -> Pending | None:
        """Queue one step's device work and return without waiting for it (rank 0: the pending sampled
        tokens; other ranks: None). `carry_rows` = (src, dst): input ids[dst] are the previous step's sampled
        tokens[src], still on the device, which lets the engine build step N+1 while step N runs
        (engine/overlap.py). For that every rank samples (the same all-gathered logits, the same seeded
        generator: the same tokens), so worker ranks have the ids too."""
        # A named range per step: under trace=true it marks which kernels are this step's (lab/trace.py).
        with torch.profiler.record_function(step_range(step)):
            return self._launch(step, carry_rows)

    def _launch(self, step: StepInput, carry_rows: tuple[list[int], list[int]] | None) -> Pending | None:
        carry = Carry(self._last_tokens, *carry_rows) if carry_rows else None
        prefill_graph = None
        if step.is_prefill and self.prefill_graphs is not None:  # before the timer: a capture is not the step's time
            prefill_graph = self.prefill_graphs.lookup(step)
        timer = StepTimer(self.device)
        use_graph = self.graphs is not None and not step.is_prefill and self.graphs.can_run(step.num_seqs)
        # Built once: the forward and the LM head (last tokens from cu_seqlens) share it.
        if use_graph:
            ctx, hidden = AttentionContext(is_prefill=False), self.graphs.replay(step, carry)
        elif prefill_graph is not None:
            ctx, hidden = prefill_graph.ctx, self.prefill_graphs.replay(prefill_graph, step, carry)
        else:
            ctx = step.to_context(self.device)
            hidden = self._forward(step, ctx, carry)
        set_context(ctx)
        try:
            logits = self.model.compute_logits(hidden)
        finally:
            reset_context()
        if not self.samples:
            return None
        temps = step.temperatures.to(self.device, non_blocking=True)
        tokens = self._last_tokens = self.sampler(logits, temps, self.generator)
        if self.rank != 0:
            return None
        if self.logits_log is not None:
            self.logits_log.append(logits.float().cpu())
        pending = Pending(step, tokens, timer, use_graph or prefill_graph is not None)
        pending.start_copy()
        return pending

    def collect(self, pending: Pending) -> list[int]:
        """Wait for a launched step's tokens (rank 0) and report the step to the timing hooks."""
        tokens = pending.wait()
        s = pending.step
        rec = StepRecord("prefill" if s.is_prefill else "decode", s.num_seqs, s.num_tokens,
                         pending.timer.elapsed(), pending.cuda_graph, s.kv_tokens_read, pending.timer.host_s)
        for hook in self.step_hooks:
            hook(rec)
        return tokens

    def shutdown(self) -> None:
        """Release the process group and the device memory (model, KV cache, graph pool), so that the next
        engine in this process (a sweep's next job) sizes its KV cache from a clean device."""
        # Graphs (which hold captured NCCL kernels), model and cache go first, the process group last.
        for m in getattr(self, "attn_layers", []):
            m.k_cache = m.v_cache = torch.tensor([])
        self.graphs = self.prefill_graphs = self.model = self.kv_cache = self.logits_log = None
        self.attn_layers = []
        if getattr(self, "device", torch.device("cpu")).type == "cuda":
            gc.collect()  # graphs and modules can sit in reference cycles
            torch.cuda.empty_cache()
        if getattr(self, "strategy", None) is not None:
            self.strategy.close()
        set_comm(None)
        set_compile(False)
        set_elementwise_kernels("torch")
        destroy_distributed()
