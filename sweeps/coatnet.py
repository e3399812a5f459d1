#!/usr/bin/env python
"""The script users start: `python sweeps/coatnet.py ...` and `ray submit cluster.yaml sweeps/coatnet.py -- ...`
(`ich sweep` runs the same). The job itself, for CoAtNet sweeps and the baselines alike, is sweeps/job.py."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python sweeps/coatnet.py`, `ray submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.job import main  # noqa: E402 - after the path above

if __name__ == "__main__":
    sys.exit(main())
