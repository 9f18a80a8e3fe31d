"""The causal transformer shared by the generator and the unified model: the network with its KV cache (causal),
the depth head over a position's k sub-codes (depth_head), the code-aware logits (code_head), the Liquid-style
code input (code_input), sampling (sampling) and the saved-folder helpers for models over a frozen tokenizer
(folders)."""
