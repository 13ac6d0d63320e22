"""What outlives a run, written crash-safe: the task history (history), adapt checkpoints
(checkpoint), the update-file format both use (updates), and atomic writes (atomic)."""
