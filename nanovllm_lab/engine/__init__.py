"""The control layer: sequences, paged KV blocks, the scheduler, the model runner and the step loop."""
