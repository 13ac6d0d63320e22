"""Language-model plumbing: models (model), tokenizers (text), batches and greedy
decoding (batches), the one training loop (train), peak-memory measurement (memory), precision
by device (precision: native bf16, fp32 attention under CPU autocast)."""
