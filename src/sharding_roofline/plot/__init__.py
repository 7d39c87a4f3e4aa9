"""Figures (matplotlib): rooflines, crossover sweeps, strategy breakdowns, collective sweeps.

Every drawing function takes an optional ``ax`` and returns the Axes it drew on. Without one
it makes a fresh ``InlineFigure``: a plain ``matplotlib.figure.Figure`` (no pyplot state)
that Jupyter shows inline when it is a cell's value (``roofline(...).figure``). ``save_*``
helpers draw on a fresh figure and write a PNG. Each line carries a ``gid``
(``"roof:compute"``, ``"sweep:0:comm"``, ...), so tests and users can read the plotted numbers
back from the Axes.

Roofline units. The HBM roof is the chip's: ``FLOPs/s = min(C, I·W_hbm)``, ``I`` in FLOPs per
byte of HBM traffic, so its ridge is the critical intensity ``C/W_hbm`` (240 on v5e). A link
roof is the same line with ``W`` the link's rate in the book's collective units: bytes of the
whole array ``V`` that an AllGather over that axis moves per second. For a wrapped TPU axis
that is the book's bidirectional ``W_ici``, so the ridge is the book's ``C/W_ici`` (2550 on
a v5p axis with wraparound, which v5p slices have only when built of whole 4x4x4 cubes; a
4-chip v5p slice is a line: ``W_uni·4/3``, ridge 3825). A strategy is drawn twice at its
attained FLOPs/s (``FLOPs / time``): filled at its FLOPs per HBM byte, hollow at its FLOPs
per byte of collective traffic, counted as AllGather-equivalent bytes of each link (an
AllReduce counts ``2V``). A communication-bound strategy whose collectives share one link
therefore sits on that link's roof.

Modules, one concept each: ``_figure`` (figures without pyplot, saving, ticks, palettes),
``roofs`` (the roofline), ``sweeps`` (crossovers along a letter and along the mesh size),
``messages`` (collectives against array size), ``breakdowns`` (per-strategy bars) and
``demo`` (the figures of ``make run``).
"""

from ._figure import InlineFigure as InlineFigure
from ._figure import Plans as Plans
from ._figure import figure_of as figure_of
from ._figure import figure_png as figure_png
from ._figure import merge_symmetric as merge_symmetric
from ._figure import new_axes as new_axes
from ._figure import plan_label as plan_label
from ._figure import problem_text as problem_text
from ._figure import save_figure as save_figure
from ._figure import subplots as subplots
from ._figure import symmetry_key as symmetry_key
from .breakdowns import breakdown as breakdown
from .breakdowns import save_breakdown as save_breakdown
from .demo import COMPARED_CHIPS as COMPARED_CHIPS
from .demo import chip_comparison as chip_comparison
from .demo import save_demo_figures as save_demo_figures
from .messages import CollectiveCase as CollectiveCase
from .messages import collective_curve as collective_curve
from .messages import collective_sweep as collective_sweep
from .messages import save_collective_sweep as save_collective_sweep
from .roofs import Roof as Roof
from .roofs import StrategyPoint as StrategyPoint
from .roofs import group_bytes_per_s as group_bytes_per_s
from .roofs import hbm_roof as hbm_roof
from .roofs import link_roofs as link_roofs
from .roofs import roofline as roofline
from .roofs import save_roofline as save_roofline
from .roofs import strategy_point as strategy_point
from .sweeps import SweepTimes as SweepTimes
from .sweeps import crossover_panels as crossover_panels
from .sweeps import crossover_sweep as crossover_sweep
from .sweeps import crossover_text as crossover_text
from .sweeps import log_crossing as log_crossing
from .sweeps import mesh_sweep as mesh_sweep
from .sweeps import save_crossover_sweep as save_crossover_sweep
from .sweeps import sweep_times as sweep_times

__all__ = [
    "COMPARED_CHIPS",
    "CollectiveCase",
    "InlineFigure",
    "Plans",
    "Roof",
    "StrategyPoint",
    "SweepTimes",
    "breakdown",
    "chip_comparison",
    "collective_curve",
    "collective_sweep",
    "crossover_panels",
    "crossover_sweep",
    "crossover_text",
    "figure_of",
    "figure_png",
    "group_bytes_per_s",
    "hbm_roof",
    "link_roofs",
    "log_crossing",
    "merge_symmetric",
    "mesh_sweep",
    "new_axes",
    "plan_label",
    "problem_text",
    "roofline",
    "save_breakdown",
    "save_collective_sweep",
    "save_crossover_sweep",
    "save_demo_figures",
    "save_figure",
    "save_roofline",
    "strategy_point",
    "subplots",
    "sweep_times",
    "symmetry_key",
]
