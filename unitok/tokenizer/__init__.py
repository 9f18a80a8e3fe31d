"""The tokenizer: configs and presets, the quantizer, projections, the reference layout, the UniTok model."""
