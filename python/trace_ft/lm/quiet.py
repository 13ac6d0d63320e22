"""transformers, quietly: what the project's output should not carry of it."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No load/save progress bars or advisory warnings from transformers in our output."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
