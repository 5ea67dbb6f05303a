"""Schedule search: partitioning, sub-microbatching, MCTS ordering, interleaving, memory tuning, baselines.

Importing this package imports nothing heavy: `pipeweaver.search.baselines` is pure Python so the trainer
client can build fallback plans; the numba and ortools parts load only when their own modules are imported.
"""
