"""The continual-learning bench: strategies (TRACE and the baselines, one interface),
metrics over the accuracy matrix, and the report of a run."""
