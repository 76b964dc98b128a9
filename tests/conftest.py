"""Shared fixtures. ``launch`` runs a worker function on several gloo processes (see ``_launch.py``)."""

from __future__ import annotations

import os
import sys

# Workers are spawned processes that import ``tests._launch`` and the worker modules by name.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
