"""Our own sparse models: the offline corpus, the BPE tokenizer, the training loop, the activation study."""
