"""Operator layer: tensor-parallel linears, embeddings, attention, RoPE, norms, activation, sampler."""
