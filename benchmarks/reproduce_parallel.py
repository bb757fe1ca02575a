"""``python benchmarks/reproduce_parallel.py [args]``: runs the experiment ``experiments/reproduce_parallel.py``
with the same arguments."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "reproduce_parallel.py"), run_name="__main__")
