"""One-off probe (session 13): prefill attention tile configs, qwen3-8b heads at tp=1 and tp=2. Call 6 also tried the
heaviest query tiles first (a `_HEAVY_FIRST` switch, since removed: within noise); this version sweeps tiles only."""
import itertools

from nanovllm_lab.kernels import bench
from nanovllm_lab.kernels import prefill_attention as pa

orig = pa._tile_config
print(f"matmul {bench.measure_matmul_tflops():.0f} TFLOP/s")
for tokens, seqs, (hq, hkv) in [(16384, 8, (32, 8)), (16384, 8, (16, 4)), (2048, 1, (16, 4)), (8192, 1, (32, 8))]:
    for heavy, (bm, bn, w, st) in itertools.product((False,), [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3),
                                                                    (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 8, 4)]):
        pa._tile_config = lambda d, dev, c=(bm, bn, w, st): c
        try:
            r = bench.bench_prefill(tokens, num_seqs=seqs, num_q_heads=hq, num_kv_heads=hkv, head_dim=128)
            print(f"T={tokens:6d} seqs={seqs} heads={hq}/{hkv} tile={bm}x{bn} w={w} st={st}: "
                  f"{r['ms']:.3f} ms {r['tflop_per_s']:6.1f} TFLOP/s", flush=True)
        except Exception as e:  # out of shared memory etc.
            print(f"T={tokens} tile={bm}x{bn} w={w} st={st}: {type(e).__name__} {str(e)[:80]}")
pa._tile_config = orig
