"""`symm`: row-parallel reductions through PyTorch symmetric memory (peer-to-peer one-shot / two-shot
all-reduce kernels, vLLM's custom all-reduce idea, without NCCL).

One symmetric buffer of `max_tokens x hidden` elements is allocated and exchanged with the TP peers at
start-up (`symm_mem.empty` + `symm_mem.rendezvous`). Each row-parallel GEMM writes its partial sum
straight into that buffer, then
- messages up to `one_shot_max_bytes`: `torch.ops.symm_mem.one_shot_all_reduce_out` (every rank reads all
  peers' buffers and sums; lowest latency),
- larger ones: `two_shot_all_reduce_out` (reduce-scatter then all-gather over P2P; less traffic).
Both kernels start and end with a barrier over the peers' signal pads, so the buffer can be reused by the
next GEMM. Reductions that do not fit (more tokens than the buffer, other dtypes than float32/bfloat16)
use NCCL. Multicast / multimem is never used (TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stays set).

Needs CUDA GPUs with peer access and the NCCL backend; at tp=1 there is nothing to reduce and it behaves
like `blocking`.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, check_int, register_strategy
from nanovllm_lab.distributed.parallel import ParallelInfo

log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)  # what the symm_mem reduction kernels dispatch on

# torch's CUDA symmetric memory exchanges rendezvous metadata through the group's store under keys numbered by a
# per-process counter (a static `StoreExchange` with a `seq_id_`, two exchanges per rendezvous). Rank 0 lives in
# the driver process across engines (a test file, a Hydra sweep); the other ranks are fresh worker processes whose
# counters start at 0. A second symm engine in one process therefore waited forever for keys the workers never
# write (seen on 2 x H200, torch 2.11: the second symm test of a file hung). We count rendezvous per process and,
# before each real one, let every rank that is behind catch up with rendezvous on a group of itself alone: those
# make the same exchanges but wait for nobody.
_rendezvous_done = 0


@dataclass(frozen=True)
class SymmConfig(StrategyConfig):
    name: str = "symm"
    one_shot_max_bytes: int = 1 << 20
    max_tokens: int = 0  # buffer capacity in tokens; 0: the engine's max_num_batched_tokens

    def __post_init__(self) -> None:
        for key in ("one_shot_max_bytes", "max_tokens"):
            check_int(self, key, lo=0)


# The torch.ops.symm_mem collectives each strategy calls: symm runs PyTorch's one-/two-shot all-reduce; symm_norm and
# async_ce only map the buffers (and use the handle's barrier), so a torch without those ops must not rule them out.
NEEDED_OPS = {"symm": ("one_shot_all_reduce", "two_shot_all_reduce_"), "symm_norm": (), "async_ce": (),
              "lamport_norm": (), "async_tp": ("fused_all_gather_matmul", "fused_matmul_reduce_scatter")}


def unavailable_reason(info: ParallelInfo, name: str = "symm") -> str | None:
    """Why strategy `name`'s symmetric-memory reductions cannot run in this process group (None: they can)."""
    if info.world_size == 1:
        return None
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "no process group"
    if not info.device.startswith("cuda") or backend != "nccl":
        return (f"strategy '{name}' needs CUDA GPUs with peer access (NCCL backend); this run uses {backend} "
                f"on {info.device.split(':')[0]}")
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"strategy '{name}' needs torch.distributed._symmetric_memory, which this torch lacks ({e})"
    for op in NEEDED_OPS.get(name, NEEDED_OPS["symm"]):
        if not hasattr(torch.ops.symm_mem, op):
            return f"strategy '{name}' needs torch.ops.symm_mem.{op}, which this torch {torch.__version__} lacks"
    me = torch.device(info.device).index or 0
    for peer in range(info.world_size):  # rank r drives cuda:r (distributed/parallel.py)
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"strategy '{name}' needs peer access between GPUs, but cuda:{me} cannot access cuda:{peer}"
    return None


def require_peer_access(info: ParallelInfo, name: str, hint: str = "") -> None:
    """Raise a ValueError with `unavailable_reason` (and `hint` after it) where strategy `name` cannot run."""
    reason = unavailable_reason(info, name)
    if reason is not None:
        raise ValueError(reason + hint)


def _torch_before(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) < (major, minor)


def _has_op(name: str) -> bool:
    try:
        return hasattr(torch.ops.symm_mem, name)
    except Exception:
        return False


def _rendezvous(tensor: torch.Tensor, group_name: str):
    """symm_mem.rendezvous, counted (see `_rendezvous_done`); returns the handle."""
    global _rendezvous_done
    import torch.distributed._symmetric_memory as symm_mem
    handle = symm_mem.rendezvous(tensor, group_name)
    _rendezvous_done += 1
    return handle


def rendezvous_buffer(numel: int, dtype: torch.dtype, device: torch.device):
    """A symmetric buffer over the default group, exchanged with every rank: (local tensor, handle).
    Collective: every rank asks for the same size."""
    import torch.distributed._symmetric_memory as symm_mem
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # belt and braces: never set up multicast
    group = dist.group.WORLD
    # Before torch 2.11 a group had to be registered first (pytorch PR 172163 deprecated that: rendezvous now
    # resolves the group and its store by name). Registering it anyway pins the group's *store* under its
    # name for the life of the process: the next engine in the same process (a sweep's next job) reuses
    # the name "0" for a new group and would rendezvous through the dead store of the old one. `forget_group`
    # drops the registration at close.
    if _torch_before(2, 11) and hasattr(symm_mem, "enable_symm_mem_for_group"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            symm_mem.enable_symm_mem_for_group(group.group_name)
    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    _align_store_exchange(group, device)
    return buf, _rendezvous(buf, group.group_name)


_WORKSPACE_OWNER: dict[str, int] = {}  # group name -> id() of the process group its cached workspace was made for


def rendezvous_workspace(min_bytes: int, device: torch.device) -> None:
    """PyTorch's own symmetric workspace of the default group (the one its async-TP operators use), made at
    least `min_bytes` now and counted like `rendezvous_buffer`. Collective. The workspace only grows (two
    strategies of one engine may ask for different sizes), and one cached under the same group name by an
    earlier engine of this process belongs to a dead group, so it is replaced. Whether to allocate is agreed by
    all ranks (a max over them), since a fresh worker has no workspace while rank 0 may have one; that also
    covers a new group object that happens to reuse a dead one's id()."""
    import torch.distributed._symmetric_memory as symm_mem
    global _rendezvous_done
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    group = dist.group.WORLD
    name = group.group_name
    cache = getattr(symm_mem, "_group_name_to_workspace_tensor", None)
    if cache is None:
        log.warning("torch %s has no _group_name_to_workspace_tensor: a workspace left by an earlier engine in "
                    "this process cannot be dropped", torch.__version__)
    have = cache.get(name) if cache is not None and _WORKSPACE_OWNER.get(name) == id(group) else None
    have_bytes = have.numel() * have.element_size() if have is not None else 0
    want = torch.tensor([int(have_bytes < min_bytes), max(have_bytes, min_bytes)], dtype=torch.int64, device=device)
    dist.all_reduce(want, op=dist.ReduceOp.MAX, group=group)
    if not int(want[0]):
        return
    forget_workspace(name)
    _align_store_exchange(group, device)
    symm_mem.get_symm_mem_workspace(name, min_size=int(want[1]))
    _rendezvous_done += 1
    _WORKSPACE_OWNER[name] = id(group)


def forget_workspace(group_name: str) -> None:
    """Drop PyTorch's cached workspace of a group name (see `rendezvous_workspace`)."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
        getattr(symm_mem, "_group_name_to_workspace_tensor", {}).pop(group_name, None)
    except ImportError:
        pass
    _WORKSPACE_OWNER.pop(group_name, None)


def _align_store_exchange(group, device) -> None:
    """Bring every rank's symmetric-memory exchange counter to the group's highest (see `_rendezvous_done`)."""
    import torch.distributed._symmetric_memory as symm_mem
    world = dist.get_world_size(group)
    mine = torch.tensor([_rendezvous_done], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine, group=group)
    counts = [int(c) for c in counts]
    if min(counts) == max(counts):
        return
    alone = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates every group
    me = alone[dist.get_rank(group)]
    log.info("strategy 'symm': aligning symmetric-memory exchange counters %s", counts)
    for _ in range(max(counts) - _rendezvous_done):
        _rendezvous(symm_mem.empty(1, dtype=torch.float32, device=device), me.group_name)


def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) written into `out` (a view of a symmetric buffer, so peers can read it)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def forget_group(group_name: str) -> None:
    """Drop a group's registration under its name (see `rendezvous_buffer`)."""
    if group_name:
        try:
            import torch.distributed._symmetric_memory as symm_mem
            getattr(symm_mem, "_group_name_to_store", {}).pop(group_name, None)
        except ImportError:
            pass


@register_strategy("symm", SymmConfig)
class SymmStrategy(CommStrategy):
    def __init__(self, cfg: SymmConfig, info: ParallelInfo) -> None:
        super().__init__(cfg, info)
        require_peer_access(info, "symm")
        self.buffer: torch.Tensor | None = None
        self.group_name = ""
        self.hidden_size = 0
        self.calls = {"one_shot": 0, "two_shot": 0, "nccl": 0}  # host-side counters (eager calls, captures)

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        if self.world_size == 1:
            return
        if dtype not in _SUPPORTED_DTYPES:
            log.warning("strategy 'symm': symm_mem kernels support float32/bfloat16, not %s; using NCCL", dtype)
            return
        self.group_name = dist.group.WORLD.group_name
        capacity = self.cfg.max_tokens or max_tokens
        self.hidden_size = hidden_size
        self.buffer, _ = rendezvous_buffer(capacity * hidden_size, dtype, self.device)
        self._one_shot_out = _has_op("one_shot_all_reduce_out")
        self._two_shot_out = _has_op("two_shot_all_reduce_out") and self.world_size in (2, 4, 8)
        log.info("strategy 'symm': %.1f MiB symmetric buffer (%d tokens), one-shot up to %d bytes",
                 self.buffer.numel() * self.buffer.element_size() / 2**20, capacity, self.cfg.one_shot_max_bytes)

    def applicable(self, ctx, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens reduces through the symmetric buffer (else NCCL)."""
        return self.buffer is not None and num_tokens * self.hidden_size <= self.buffer.numel()

    def symm_all_reduce(self, view: torch.Tensor) -> torch.Tensor:
        """Sum `view` (a leading slice of the symmetric buffer) over the group into a new tensor."""
        ops = torch.ops.symm_mem
        out = torch.empty(view.shape, dtype=view.dtype, device=view.device)
        if view.numel() * view.element_size() <= self.cfg.one_shot_max_bytes:
            self.calls["one_shot"] += 1
            if self._one_shot_out:
                ops.one_shot_all_reduce_out(view, "sum", self.group_name, out)
            else:
                out.copy_(ops.one_shot_all_reduce(view, "sum", self.group_name))
        else:
            self.calls["two_shot"] += 1
            if self._two_shot_out:
                ops.two_shot_all_reduce_out(view, "sum", self.group_name, out)
            else:
                ops.two_shot_all_reduce_(view, "sum", self.group_name)
                out.copy_(view)
        return out

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        buf = self.buffer
        n, h = x.shape[0], weight.shape[0]
        if (buf is None or x.dim() != 2 or h != self.hidden_size or n * h > buf.numel() or x.dtype != buf.dtype
                or n * h * buf.element_size() % 4):  # the kernels need 4-byte aligned sizes
            self.calls["nccl"] += 1
            return super().row_parallel(x, weight, bias)
        view = buf[: n * h].view(n, h)  # offset 0: peers see the same rows at the same addresses
        return self.symm_all_reduce(linear_into(view, x, weight, bias))

    def close(self) -> None:
        self.buffer = None
        forget_group(self.group_name)

