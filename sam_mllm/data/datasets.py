"""Named datasets: which task each one is, where it lives under ``data_root``, how to prepare it.

Every dataset on disk is a folder holding ``annotations.json`` in the sample schema
(``sam_mllm.data.schema``); ``prepare`` names the ``python -m sam_mllm.data.prepare`` converter
that builds that folder from the benchmark's original release.
"""

from __future__ import annotations

from dataclasses import dataclass

from sam_mllm.registry import register


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: str
    path: str  # default folder, relative to data_root
    prepare: str  # converter name for `python -m sam_mllm.data.prepare`, or how to obtain it
    paper: bool = True  # one of the paper's ten evaluation benchmarks


_DATASETS = [
    DatasetInfo("conceptual", "group_captioning", "conceptual", "passthrough (the SAM authors' converted set)"),
    DatasetInfo("animal", "group_captioning", "nico_animal", "nico"),
    DatasetInfo("vehicle", "group_captioning", "nico_vehicle", "nico"),
    DatasetInfo("aesop", "storytelling", "aesop", "aesop"),
    DatasetInfo("vist", "storytelling", "vist", "vist"),
    DatasetInfo("dm800k", "storytelling", "dm800k", "passthrough (distributed by its authors on request)"),
    DatasetInfo("iedit", "change_captioning", "iedit", "iedit"),
    DatasetInfo("spot_the_diff", "change_captioning", "spot_the_diff", "spot_the_diff"),
    DatasetInfo("birds_to_words", "change_captioning", "birds_to_words", "birds_to_words"),
    DatasetInfo("clevr_change", "change_captioning", "clevr_change", "clevr_change"),
    # The embedded synthetic world (``python -m sam_mllm.data.synthetic``).
    DatasetInfo("synthetic_group_captioning", "group_captioning", "synthetic/group_captioning/test",
                "synthetic", paper=False),
    DatasetInfo("synthetic_storytelling", "storytelling", "synthetic/storytelling/test", "synthetic", paper=False),
    DatasetInfo("synthetic_change_captioning", "change_captioning", "synthetic/change_captioning/test",
                "synthetic", paper=False),
    DatasetInfo("synthetic_mmlink", "group_captioning", "synthetic/mmlink/train", "synthetic", paper=False),
    # Held-out MmLINK-style pairs: the training task itself, on unseen scenes.
    DatasetInfo("synthetic_mmlink_test", "group_captioning", "synthetic/mmlink/test", "synthetic", paper=False),
]

for _info in _DATASETS:
    register("dataset", _info.name)(_info)

PAPER_DATASETS = tuple(d.name for d in _DATASETS if d.paper)
