"""The miniature unified model: text tokenizer, sequence format, tasks, model, trainer."""
