"""TRACE inside other training stacks (hf: the Hugging Face Trainer)."""
