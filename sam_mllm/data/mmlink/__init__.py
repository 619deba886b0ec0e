"""MmLINK synthesis (SAM paper §3, Fig. 2): segment same-identity objects, compose them in pairs
with distractors, inpaint new backgrounds, describe and refine the shared object, filter.

    python -m sam_mllm.data.mmlink --config configs/mmlink/characters.yaml [key=value ...]

Stages and their registry kinds (``mmlink_<stage>``): source, segmenter, compositor, writer,
inpainter, describer, refiner, qc. See docs/MMLINK.md.
"""

from sam_mllm.data.mmlink.config import MmlinkConfig, load_mmlink_config
from sam_mllm.data.mmlink.pipeline import MmlinkPipeline, RunSummary, build_stage, build_stages, run
from sam_mllm.data.mmlink.stages import STAGES, PipelineError

__all__ = ["STAGES", "MmlinkConfig", "MmlinkPipeline", "PipelineError", "RunSummary", "build_stage",
           "build_stages", "load_mmlink_config", "run"]
