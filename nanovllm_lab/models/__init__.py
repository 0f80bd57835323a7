"""Model architectures: the Qwen3 implementation and the architecture descriptions it is built from."""
