"""The sampler draws from softmax(logits / t) (Gumbel-max) and is exactly greedy at temperature 0."""
import torch

from nanovllm_lab.layers.sampler import Sampler


def test_temperature_sampling_matches_softmax():
    torch.manual_seed(0)
    logits = torch.randn(6) * 2
    n, t = 40000, 0.7
    temps = torch.full((n,), t)
    gen = torch.Generator().manual_seed(1)
    tokens = Sampler()(logits.expand(n, -1).to(torch.bfloat16), temps, gen)
    freq = torch.bincount(tokens, minlength=6).double() / n
    want = torch.softmax(logits.to(torch.bfloat16).float() / t, -1).double()
    # 40k draws: the standard error of each frequency is <= 0.0025; 0.012 is ~5 sigma.
    assert torch.allclose(freq, want, atol=0.012), (freq, want)


def test_greedy_rows_and_seeded_reproducibility():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    temps = torch.tensor([0.0, 1.0] * 4)
    a = Sampler()(logits, temps, torch.Generator().manual_seed(3))
    b = Sampler()(logits, temps, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a[0::2], logits[0::2].argmax(-1))
    # at a high temperature the sampled rows are not all the argmax
    hot = Sampler()(logits.repeat(50, 1), torch.full((400,), 5.0), torch.Generator().manual_seed(4))
    assert not torch.equal(hot, logits.repeat(50, 1).argmax(-1))


def test_split_argmax_equals_argmax_ties_included():
    from nanovllm_lab.layers.sampler import _argmax_split, _parts
    assert _parts(151936) == 32 and _parts(1000) == 8 and _parts(999) == 1
    torch.manual_seed(0)
    x = torch.randn(5, 1024)
    x[1, 100] = x[1, 900] = 10.0  # a tie across chunks: the first index wins
    x[2, 40] = x[2, 41] = 10.0    # a tie inside a chunk
    x[3] = 0.0                    # all equal
    for parts in (1, 2, 8, 32):
        assert torch.equal(_argmax_split(x, parts), x.argmax(-1))
    assert _argmax_split(x, 8)[1].item() == 100 and _argmax_split(x, 8)[3].item() == 0
