"""`overlap`, the flagship: per step, delegate to whichever of blocking / async / chunked / symm was
measured fastest for this phase and token count, on this model, TP size and card.

The choices come from a JSON table (`tables/default.json` unless `table` names another), written by a
tuning run with `write_table(rows, path)` (comm/overlap_write.py) from sweep rows. Table format:

    {"format": 1, "entries": [
      {"model": "qwen3-8b", "hidden_size": 4096, "intermediate_size": 12288, "tp": 2, "card": "H200",
       "rules": {"decode":  [{"max_tokens": 128, "choices": [{"strategy": "symm", "params": {}}, ...]},
                             {"max_tokens": null, "choices": [{"strategy": "blocking"}]}],
                 "prefill": [...]}},
      {"model": "*", "tp": "*", "card": "*", "rules": {...}}]}

An entry matches when each of its keys matches ("*" matches anything; `card` is a case-insensitive
substring of the device name; a model matches by its hidden and intermediate sizes, which identify the
shapes that decide the timings). The most specific match wins. Within it, the first rule whose
`max_tokens` bound (null: no bound) holds the step's token count gives an ordered list of choices; the
first one that is available on this backend (symm and symm_norm need NCCL GPUs with P2P; nothing but
blocking at tp=1), allowed by `candidates` and applicable to this step (e.g. async needs two sequences) runs.
Blocking is the last resort. The choice is made in `run_layers`, once per forward pass, identically on
every rank, so CUDA graphs capture it per batch size.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from nanovllm_lab.comm.base import (CommStrategy, StrategyConfig, build_strategy, register_strategy,
                                    resolve_strategy)
from nanovllm_lab.distributed.parallel import ParallelInfo
from nanovllm_lab.utils.context import get_context

log = logging.getLogger(__name__)

DEFAULT_TABLE = os.path.join(os.path.dirname(__file__), "tables", "default.json")
NOT_DELEGATES = ("overlap",)  # itself; the bounds (valid_outputs False: none, none_mb) are left out by delegates()
# These need NCCL GPUs with peer access: skipped elsewhere, not an error
SYMMETRIC_MEMORY = ("symm", "symm_norm", "async_ce", "async_rsag_ce", "lamport_norm", "async_tp")


def delegates() -> list[str]:
    """The strategies `overlap` may choose from: every registered one but itself and the bounds (`none`,
    `none_mb`: strategies whose outputs are wrong by design)."""
    from nanovllm_lab.comm.base import STRATEGIES, _load_builtins
    _load_builtins()
    return [n for n in STRATEGIES.names() if n not in NOT_DELEGATES and STRATEGIES.get(n)[1].valid_outputs]


@dataclass(frozen=True)
class OverlapConfig(StrategyConfig):
    name: str = "overlap"
    table: str = ""                                        # path of a table; "" = tables/default.json
    candidates: tuple = ()  # the strategies it may pick; empty: every registered one but overlap and none

    def __post_init__(self) -> None:
        cands = (self.candidates,) if isinstance(self.candidates, str) else tuple(self.candidates)
        valid = delegates()
        object.__setattr__(self, "candidates", cands or tuple(valid))  # YAML lists become hashable tuples
        bad = [c for c in cands if c not in valid]
        if bad:
            raise ValueError(f"strategy {self.name!r}: candidates must be a subset of {valid}, "
                             f"got {self.candidates!r}")
        if not isinstance(self.table, str) or (self.table and not os.path.isfile(self.table)):
            raise ValueError(f"strategy {self.name!r}: table {self.table!r} is not a file")


# -- the table ----------------------------------------------------------------------------------------
def _choice_key(choice: dict) -> tuple[str, str]:
    return choice["strategy"], json.dumps(choice.get("params") or {}, sort_keys=True)


def load_table(path: str = "") -> dict:
    """Read and check a table; every choice's parameters are validated by its strategy's config."""
    path = path or DEFAULT_TABLE
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"overlap table {path}: expected an object with a list 'entries'")
    valid = delegates()
    for i, e in enumerate(table["entries"]):
        for phase, rules in e.get("rules", {}).items():
            if phase not in ("prefill", "decode"):
                raise ValueError(f"overlap table {path}: entry {i} has unknown phase {phase!r}")
            for r in rules:
                if "choices" not in r:  # shorthand: one strategy per rule
                    r["choices"] = [{"strategy": r.pop("strategy"), "params": r.pop("params", {})}]
                for c in r["choices"]:
                    if c["strategy"] not in valid:
                        raise ValueError(f"overlap table {path}: entry {i} names {c['strategy']!r}; "
                                         f"valid: {', '.join(valid)}")
                    resolve_strategy({"name": c["strategy"], **(c.get("params") or {})})
            rules.sort(key=lambda r: math.inf if r.get("max_tokens") is None else r["max_tokens"])
    return table


def _entry_shape(entry: dict) -> tuple[int, int] | None:
    """The (hidden, intermediate) sizes an entry is for; None for "*" (or an unknown model without sizes)."""
    if "hidden_size" in entry and "intermediate_size" in entry:
        return int(entry["hidden_size"]), int(entry["intermediate_size"])
    model = entry.get("model", "*")
    if model == "*":
        return None
    from nanovllm_lab.models.arch import BUILTIN_ARCHS
    a = BUILTIN_ARCHS.get(model)
    return (a.hidden_size, a.intermediate_size) if a is not None else (-1, -1)


def match_entry(table: dict, tp: int, card: str, shape: tuple[int, int] | None) -> dict | None:
    """The most specific entry for this TP size, card and model shape (None if nothing matches)."""
    best, best_score = None, -1
    for e in table["entries"]:
        score = 0
        if e.get("tp", "*") != "*":
            if int(e["tp"]) != tp:
                continue
            score += 2
        if e.get("card", "*") != "*":
            if str(e["card"]).lower() not in card.lower():
                continue
            score += 1
        eshape = _entry_shape(e)
        if eshape is not None:
            if eshape != shape:
                continue
            score += 4
        if score > best_score:
            best, best_score = e, score
    return best


def device_card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _layer_shape(layers, world_size: int) -> tuple[int, int] | None:
    try:
        w = layers[0].mlp.down_proj.weight  # [hidden, intermediate / tp]
        return int(w.shape[0]), int(w.shape[1]) * world_size
    except (AttributeError, IndexError, TypeError):
        return None


@register_strategy("overlap", OverlapConfig)
class OverlapStrategy(CommStrategy):
    def __init__(self, cfg: OverlapConfig, info: ParallelInfo) -> None:
        super().__init__(cfg, info)
        self.info = info
        self.table = load_table(cfg.table)
        self.card = device_card(self.device)
        self._blocking = build_strategy(StrategyConfig(name="blocking"), info)
        self._active: CommStrategy = self._blocking
        self._entry: dict | None | bool = False  # False: not resolved yet (needs the model's shapes)
        self._embedded_by: CommStrategy | None = None  # the delegate that took this step's embedding reduction
        self.history: dict[tuple[str, int], str] = {}  # (phase, tokens) -> the strategy that ran
        # Build every delegate any entry for this tp/card could pick, now: symm allocates and exchanges its
        # buffer (a collective) in prepare(), which must not happen lazily inside a forward or a capture.
        bounds: dict[tuple[str, str], float] = defaultdict(float)
        for e in self.table["entries"]:
            if e.get("tp", "*") not in ("*", self.world_size) or (
                    e.get("card", "*") != "*" and str(e["card"]).lower() not in self.card.lower()):
                continue
            for rules in e.get("rules", {}).values():
                for r in rules:
                    for c in r["choices"]:
                        b = math.inf if r.get("max_tokens") is None else r["max_tokens"]
                        bounds[_choice_key(c)] = max(bounds[_choice_key(c)], b)
        self.delegates: dict[tuple[str, str], CommStrategy] = {}
        for (name, params_json), bound in bounds.items():
            params = json.loads(params_json)
            if not self.available(name, params):
                continue
            if name == "blocking":
                self.delegates[(name, params_json)] = self._blocking
                continue
            if name == "symm" and "max_tokens" not in params and bound != math.inf:
                params["max_tokens"] = int(bound)  # a buffer only as large as the rules using it need
            self.delegates[(name, params_json)] = build_strategy(resolve_strategy({"name": name, **params}), info)

    def available(self, name: str, params: dict | None = None) -> bool:
        """Whether `name` may run here: allowed by `candidates` and useful/possible on this backend (an
        `emulate` delegate runs its symmetric-memory logic over gloo: CPU tests)."""
        if name == "blocking":
            return True
        if name not in self.cfg.candidates or self.world_size == 1:
            return False
        if name in SYMMETRIC_MEMORY and not (params or {}).get("emulate"):
            from nanovllm_lab.comm.symm import unavailable_reason
            return unavailable_reason(self.info, name) is None
        return True

    def choose(self, layers, is_prefill: bool, num_tokens: int) -> CommStrategy:
        if self._entry is False:
            self._entry = match_entry(self.table, self.world_size, self.card, _layer_shape(layers, self.world_size))
        if not self._entry:
            return self._blocking
        ctx = get_context()
        for rule in self._entry.get("rules", {}).get("prefill" if is_prefill else "decode", []):
            if rule.get("max_tokens") is not None and num_tokens > rule["max_tokens"]:
                continue
            for c in rule["choices"]:
                s = self.delegates.get(_choice_key(c))
                if s is not None and (not hasattr(s, "applicable") or s.applicable(ctx, num_tokens)):
                    return s
            break
        return self._blocking

    # -- delegation ---------------------------------------------------------------------------------------
    def reduce_embedding(self, x: torch.Tensor) -> torch.Tensor:
        # The step's delegate reduces the embedding too (async_rsag and async_rsag_ce do it per micro-batch,
        # inside run_layers). The table entry needs the layers' shapes, so until the first run_layers matched it
        # the plain all-reduce runs; choose() gives run_layers the same delegate for the same step.
        if self._entry is False:
            return super().reduce_embedding(x)
        self._embedded_by = self.choose(None, get_context().is_prefill, x.shape[0])
        return self._embedded_by.reduce_embedding(x)

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_prefill = get_context().is_prefill
        s = self.choose(layers, is_prefill, hidden.shape[0])
        embedded_by, self._embedded_by = self._embedded_by, None
        if embedded_by is not None and embedded_by is not s:  # its unreduced embedding would reach s
            if hasattr(embedded_by, "_embed_pending"):  # nor may a later call of that delegate take it for its own
                embedded_by._embed_pending = False
            raise RuntimeError(f"overlap: the step's embedding went to {embedded_by.name} but its layers to {s.name}")
        self.history[("prefill" if is_prefill else "decode", int(hidden.shape[0]))] = s.name
        self._active = s
        try:
            return s.run_layers(layers, positions, hidden)
        finally:
            self._active = self._blocking

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._active.row_parallel(x, weight, bias)

    def column_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._active.column_parallel(x, weight, bias)

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        seen = set()
        for s in [self._blocking, *self.delegates.values()]:
            if id(s) not in seen:
                seen.add(id(s))
                s.prepare(max_tokens, hidden_size, dtype)

    def check(self) -> None:
        for s in self.delegates.values():
            s.check()

    def close(self) -> None:
        for s in self.delegates.values():
            s.close()
