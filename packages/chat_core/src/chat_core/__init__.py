"""chat-core: models, checkpoints, tokenizers, sampling and the abstract engine."""
