"""Language-model plumbing: models (model), tokenizers (text), batches and greedy
decoding (batches), the one training loop (train), peak-memory measurement (memory)."""
