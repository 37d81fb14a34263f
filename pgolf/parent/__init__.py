"""Everything that runs outside the worker: the Hydra parent (run, compose, callbacks, console,
outdir, slots, tracking), the sweep report, and the packer with its CLIs (pack, submission, plan,
check). Nothing under this package ships in a run's `train_gpt.py` (docs/architecture.md#what-ships);
a worker module may import it only lazily, on a path a packed run never takes.
"""
