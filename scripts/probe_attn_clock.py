"""One-off probe (session 14): is the prefill attention kernel slower inside an engine step because the GEMMs
around it lower the clock? Session 13 measured 34.6 ms for it in a traced 16384-token qwen3-8b tp=1 step
against 26.6 ms alone at the same shape (8 prompts of 2048 tokens, 32/8 heads).

Times the kernel with CUDA events (median of 36 calls, one per layer of the model) three ways: back to back,
each call after a gate_up-sized GEMM (16384 x 4096 x 24576), and each after the same GEMM then an idle spin of 2e6 cycles (about 1 ms)
spin. Samples the SM clock and power (NVML, through torch.cuda) while each loop runs."""
import statistics
import time

import torch

from nanovllm_lab.kernels.prefill_attention import paged_prefill_attention

hq, hkv, d, seqs, seq = 32, 8, 128, 8, 2048
n = seqs * seq
dev = torch.device("cuda")
q = torch.randn(n, hq, d, dtype=torch.bfloat16, device=dev)
k = torch.randn(n, hkv, d, dtype=torch.bfloat16, device=dev)
v = torch.randn(n, hkv, d, dtype=torch.bfloat16, device=dev)
cu = torch.arange(0, n + 1, seq, dtype=torch.int32, device=dev)
x = torch.randn(n, 4096, dtype=torch.bfloat16, device=dev)
w = torch.randn(24576, 4096, dtype=torch.bfloat16, device=dev)
flops = seqs * 2 * 2 * seq * seq / 2 * hq * d


def attn():
    return paged_prefill_attention(q, k, v, k, v, cu, cu, seq, seq, None, d ** -0.5)


def sample(fn_loop, layers=36):
    """Queue the loop, sample clock and power while the GPU works through it, return attention ms per call."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(layers)]
    torch.cuda.synchronize()
    fn_loop(ev)
    clocks, power = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        try:
            clocks.append(torch.cuda.clock_rate(dev))
            power.append(torch.cuda.power_draw(dev) / 1000)
        except Exception as e:  # no NVML in the image: the timings still stand
            clocks.append(f"n/a ({type(e).__name__})")
            break
        time.sleep(0.005)
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in ev]
    return ms, clocks, power


def back_to_back(ev):
    for a, b in ev:
        a.record(); attn(); b.record()


def after_gemm(ev):
    for a, b in ev:
        torch.nn.functional.linear(x, w); a.record(); attn(); b.record()


def after_gemm_and_idle(ev):
    for a, b in ev:
        torch.nn.functional.linear(x, w); torch.cuda._sleep(2_000_000); a.record(); attn(); b.record()


for _ in range(3):
    attn(); torch.nn.functional.linear(x, w)
for rnd in range(2):
    for name, loop in (("back to back", back_to_back), ("after a GEMM", after_gemm),
                       ("after a GEMM + ~1 ms idle", after_gemm_and_idle), ("back to back", back_to_back)):
        ms, clocks, power = sample(loop)
        med = statistics.median(ms)
        print(f"round {rnd} {name:26s}: {med:.3f} ms (p10 {sorted(ms)[3]:.3f}, p90 {sorted(ms)[32]:.3f}) "
              f"{flops / med / 1e9:6.1f} TFLOP/s x36 = {36 * med:.1f} ms | SM MHz {clocks[:6]} W {power[:6]}",
              flush=True)
