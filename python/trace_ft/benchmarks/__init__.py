"""Standard benchmarks (ARC, HellaSwag, PIQA, MMLU, ...), offline."""
