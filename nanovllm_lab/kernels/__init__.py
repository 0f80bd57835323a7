"""Triton kernels subpackage: paged KV-cache store, paged decode attention, varlen prefill attention, and the
one-shot and two-shot all-reduce fused with the residual add and RMSNorm (`symm_norm` strategy).

Modules import triton at import time, so import them only where triton is available (the `triton` attention
backend does so lazily). On CPU they run under the Triton interpreter (`TRITON_INTERPRET=1`), which is how
the unit tests exercise them without a GPU.
"""
