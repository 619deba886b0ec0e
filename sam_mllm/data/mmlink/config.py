"""The pipeline's YAML schema: run settings plus one ``{name: <registry name>, **options}`` section
per stage. Loaded like every other config (``defaults:`` chains, ``key=value`` overrides); a stage's
options are checked against its backend's constructor when the stage is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sam_mllm.config import ConfigError, merge_onto_schema


@dataclass
class MmlinkConfig:
    output_dir: str = "runs/mmlink"
    seed: int = 0
    # Accepted samples wanted; attempts stop at ``max_attempts`` (null: 2 x num_samples) so a QC that
    # rejects everything ends the run instead of looping.
    num_samples: int = 100
    max_attempts: int | None = None
    # Sample ids are ``{id_prefix}{index:05d}`` (the synthetic world's mmlink split: mmlink-train-).
    id_prefix: str = "mmlink-"
    image_size: int = 512
    # The instruction of every sample is one of these, chosen by the sample's seed; null = the
    # synthetic world's four MmLINK questions.
    instructions: list[str] | None = None
    # Rewrite annotations.json every this many committed samples (it is always written at the end).
    flush_every: int = 100
    # Continue a run found in output_dir (same config); false refuses to touch a non-empty output_dir.
    resume: bool = True
    source: dict[str, Any] = field(default_factory=lambda: {"name": "procedural"})
    segmenter: dict[str, Any] = field(default_factory=lambda: {"name": "oracle"})
    compositor: dict[str, Any] = field(default_factory=lambda: {"name": "paste"})
    writer: dict[str, Any] = field(default_factory=lambda: {"name": "templates"})
    inpainter: dict[str, Any] = field(default_factory=lambda: {"name": "stable_diffusion"})
    describer: dict[str, Any] = field(default_factory=lambda: {"name": "oracle"})
    refiner: dict[str, Any] = field(default_factory=lambda: {"name": "template"})
    qc: dict[str, Any] = field(default_factory=lambda: {"name": "rules"})


def load_mmlink_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MmlinkConfig:
    """Schema defaults <- YAML (with its ``defaults`` chain) <- ``key=value`` overrides."""
    cfg, source = merge_onto_schema(MmlinkConfig, path, overrides)
    for stage in ("source", "segmenter", "compositor", "writer", "inpainter", "describer", "refiner", "qc"):
        section = getattr(cfg, stage)
        if not isinstance(section.get("name"), str):
            raise ConfigError(f"{source}: key '{stage}.name' is missing (the {stage}'s registry name)")
    if cfg.num_samples < 1:
        raise ConfigError(f"{source}: key 'num_samples': must be >= 1")
    return cfg


def to_yaml(cfg: MmlinkConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
