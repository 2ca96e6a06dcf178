"""The embedded default model: corpus, tokenizer, training, quality checks."""
