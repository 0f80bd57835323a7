"""Bad input: each a clear error naming the problem; the engine stays usable; no process is left behind."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time

import pytest

from nanovllm_lab import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64) as engine:
        yield engine


def test_request_errors_leave_engine_usable(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], SP, use_tqdm=False)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([""], SP, use_tqdm=False)
    with pytest.raises(ValueError, match="exceeds max_model_len=64"):
        llm.generate([[1] * 62], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="token id 320 is outside the vocabulary"):
        llm.generate([[1, 320]], SP, use_tqdm=False)
    with pytest.raises(ValueError, match="token id -1"):
        llm.generate([[-1]], SP, use_tqdm=False)
    assert llm.is_finished()  # nothing half-queued
    assert len(llm.generate([[1, 2, 3]], SP, use_tqdm=False)[0]["token_ids"]) == 4


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_unknown_kwarg_names_it(qwen3_dir):
    with pytest.raises(TypeError, match="'max_num_seq'"):
        LLM(qwen3_dir, max_num_seq=4)


@pytest.mark.parametrize("kwargs, match", [
    ({"tensor_parallel_size": 3}, "must divide the attention heads"),
    ({"tensor_parallel_size": 64}, "must divide|exceeds"),
    ({"max_num_seqs": 0}, "Config.max_num_seqs"),
    ({"gpu_memory_utilization": 1.5}, "Config.gpu_memory_utilization"),
    ({"dtype": "float8"}, "Config.dtype"),
    ({"load_format": "pt"}, "Config.load_format"),
    ({"attention_backend": "nope"}, "unknown attention backend 'nope'; valid: flash_attn, torch, triton"),
    ({"strategy": "nope"}, "unknown strategy 'nope'; valid: .*blocking"),
    ({"prefill_graphs": -1}, "Config.prefill_graphs: must be an integer >= 0"),
    ({"prefill_graphs": True}, "Config.prefill_graphs"),
    ({"elementwise_kernels": "cuda"}, r"Config.elementwise_kernels: must be one of \['auto', 'triton', 'torch'\]"),
    ({"elementwise_kernels": "triton", "device": "cpu"}, "elementwise_kernels='triton' needs a CUDA device"),
])
def test_config_errors(qwen3_dir, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LLM(qwen3_dir, **kwargs)


def test_tp_above_available_devices():
    with pytest.raises(ValueError, match="exceeds the .* CPU cores available"):
        LLM("tiny", tensor_parallel_size=(os.cpu_count() or 1) * 2 if (os.cpu_count() or 1) * 2 <= 4 else 8)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a built-in"):
        LLM(str(tmp_path / "nope"))


def test_truncated_safetensors(qwen3_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qwen3_dir, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        LLM(str(bad))


def _edited_checkpoint(src: str, dest, edit) -> str:
    """A copy of the checkpoint whose tensors went through `edit(dict)`."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return str(dest)


def test_missing_tensor_named(qwen3_dir, tmp_path):
    bad = _edited_checkpoint(qwen3_dir, tmp_path / "missing",
                             lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        LLM(bad)


def test_misshaped_tensor_named(qwen3_dir, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = _edited_checkpoint(qwen3_dir, tmp_path / "shape", lambda t: t.update({name: t[name][:, :8].contiguous()}))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.weight"):
        LLM(bad)


def test_tp_errors_leave_no_process(qwen3_dir, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(qwen3_dir, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LLM(str(bad), tensor_parallel_size=2)
    time.sleep(0.2)
    assert mp.active_children() == []


def test_worker_death_raises_naming_rank(qwen3_dir):
    llm = LLM(qwen3_dir, tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=16)
    try:
        assert llm.generate([[1, 2, 3]], SP, use_tqdm=False)
        worker = llm.control.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(5)
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            llm.generate([[1, 2, 3]], SP, use_tqdm=False)
        assert time.monotonic() - t < 10
    finally:
        llm.exit()
    assert mp.active_children() == []


def test_exit_leaves_no_worker(qwen3_dir):
    with LLM(qwen3_dir, tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=16) as llm:
        procs = list(llm.control.procs)
        assert all(p.is_alive() for p in procs)
    assert not any(p.is_alive() for p in procs)


def test_interpreter_exit_leaves_no_worker(tmp_path):
    """A script that never calls exit(): its workers still go when the interpreter does."""
    import subprocess
    import sys
    script = tmp_path / "s.py"
    script.write_text("from nanovllm_lab import LLM\nif __name__ == '__main__':\n"
                      "    llm = LLM('tiny', tensor_parallel_size=2, max_model_len=128)\n"
                      "    print(' '.join(str(p.pid) for p in llm.control.procs), flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    assert pids
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_dying_at_start_raises_instead_of_hanging(tmp_path):
    """Without a main guard, spawned workers fail to bootstrap: rank 0 must say so, not wait in the rendezvous."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text("from nanovllm_lab import LLM\nLLM('tiny', tensor_parallel_size=2, max_model_len=128)\n")
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t < 60
    assert r.returncode != 0
    assert "worker rank 1 died before it could start" in r.stderr and "__main__" in r.stderr


def test_stuck_process_group_teardown_is_bounded_and_named(tmp_path, monkeypatch, caplog):
    """A teardown that never returns (rank 0's NCCL abort did so on 2 x H200) costs the engine's exit at most
    NANOVLLM_TEARDOWN_TIMEOUT_S; the process then refuses a new tensor-parallel engine with an error that says why."""
    import torch.distributed as dist

    from nanovllm_lab.distributed import parallel

    release = __import__("threading").Event()
    real_destroy = dist.destroy_process_group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: release.wait(20))  # 20: no hang if unbounded
    monkeypatch.setenv(parallel.TEARDOWN_TIMEOUT_ENV, "0.5")
    try:
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="nanovllm_lab.distributed.parallel"):
            parallel.destroy_distributed()
        assert time.monotonic() - t0 < 5
        assert "did not tear down within 0.5 s" in caplog.text
        with pytest.raises(RuntimeError, match="did not tear down within 0.5 s.*new process"):
            parallel.init_distributed(0, 2, "cpu", str(tmp_path / "store2"))
    finally:
        release.set()
        monkeypatch.setattr(dist, "destroy_process_group", real_destroy)
        if dist.is_initialized():
            real_destroy()
        parallel._STUCK_TEARDOWN = ""


def test_teardown_timeout_setting_is_checked(monkeypatch):
    from nanovllm_lab.distributed import parallel
    monkeypatch.setenv(parallel.TEARDOWN_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="NANOVLLM_TEARDOWN_TIMEOUT_S must be a number"):
        parallel.teardown_timeout_s()
    monkeypatch.setenv(parallel.TEARDOWN_TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="must be > 0"):
        parallel.teardown_timeout_s()
