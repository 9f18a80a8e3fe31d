"""One causal transformer with its KV cache, the depth head over k sub-codes, and sampling, shared by the generator and the unified model."""
