"""Synthetic pedestrians and the datasets built from them, in the real layouts (tests, demo, benchmarks).

``render`` draws one person crop whose identity is learnable; ``datasets`` writes Market-1501,
DukeMTMC-reID, CUHK03-NP and folder layouts; ``cuhk03`` writes a MATLAB v7.3 ``cuhk-03.mat``.
"""

from reid.synthetic.datasets import (
    PlannedImage,
    market1501_dataset,
    plan_market1501,
    write_cuhk03_np,
    write_dukemtmcreid,
    write_folder,
    write_images,
    write_market1501,
)
from reid.synthetic.cuhk03 import write_cuhk03
from reid.synthetic.render import render_person

__all__ = [
    "PlannedImage",
    "market1501_dataset",
    "plan_market1501",
    "render_person",
    "write_cuhk03",
    "write_cuhk03_np",
    "write_dukemtmcreid",
    "write_folder",
    "write_images",
    "write_market1501",
]
