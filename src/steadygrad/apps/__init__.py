"""Applications built on steadygrad: the benchmark harness (:mod:`.bench`), the demo experiment
and its report (:mod:`.demo`), the 2-D test functions and their plots (:mod:`.trace`).

They use the library's public API only and nothing in the library imports them: ``import
steadygrad`` loads none of this package (nor matplotlib). :mod:`steadygrad.cli` is the command
line around them (argument parsing and printing).
"""

from __future__ import annotations

__all__ = ["COLORS"]

# matplotlib's "tab10" colours less its grey, which looks like the contours and the text: distinct
# from each other and from everything else drawn. A trajectory beyond the ninth reuses them.
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
)
