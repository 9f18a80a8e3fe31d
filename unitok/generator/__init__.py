"""The token generator over a frozen tokenizer's codes: its model and its trainer."""
