"""``python benchmarks/reproduce_lm.py [args]``: runs the experiment ``experiments/reproduce_lm.py`` with the
same arguments."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "reproduce_lm.py"), run_name="__main__")
