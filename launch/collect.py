"""Collect the results of a fine-tuning sweep: ``python launch/collect.py SWEEP [--csv F] [--md F] [--sets a,b]``.

A thin entry point next to the launch scripts; the code is :mod:`segment.results` (also
``python -m segment.results``), shared with ``launch.study``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from segment.results import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
