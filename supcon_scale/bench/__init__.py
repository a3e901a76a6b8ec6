"""Benchmarks, one module per tool: `loss` (tools/bench_loss.py), `loader` (tools/bench_dataloader.py) and `train`
(tools/bench_train.py, the real `trainer.train_step`). Figures and how to read them: docs/BENCHMARKS.md.

They sit above the trainer, beside cli.py: a benchmark may import anything below it, nothing imports a benchmark.
"""
