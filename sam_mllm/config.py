"""YAML configs through omegaconf, ``key=value`` overrides, validated against typed schemas.

A config file is merged onto the dataclass schema below, so a misspelt key or a value of the wrong
type fails at load time with the full key path named (``model.contxt``), not deep inside a run.
Configs may ``defaults: [other.yaml, ...]`` to inherit from files relative to themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam_mllm.errors import UserError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A config that cannot be loaded: names the file and the key path."""


@dataclass
class MMFSConfig:
    # MM-Interleaved's feature synchronizer (variants mmfs, sam_mmfs; sam_mllm/models/mmfs.py).
    every: int = 4  # in LLM layers 0, every, 2*every, ... (official cross_attention_frequency)
    heads: int = 16  # attention heads (the vision width must divide by it)
    points: int = 8  # sampling points per head, image and level
    levels: str = "single"  # single (the ViT's patch grid) | pyramid (parameter-free 2x up, grid, 2x pool)
    offset_init: float = 3.0  # initial sampling offsets ~ U(-x, x) cells of the patch grid
    max_images: int = 50  # rows of the image-position embedding (images seen by a token must be fewer)


@dataclass
class ModelConfig:
    # Registry name of the variant: instructblip | sam | sam_bsg_mean | sam_linear | llava_mlp.
    name: str = "sam"
    # Hugging Face id or local directory of an InstructBLIP checkpoint; ignored when ``dims`` is set.
    backbone: str = "Salesforce/instructblip-vicuna-7b"
    # Build the backbone from dimensions instead (random weights): a preset name (tiny | base | 7b)
    # or a mapping of BackboneDims fields.
    dims: Any = None
    # Directory with tokenizers for a dims-built backbone; null = the synthetic-world word tokenizers.
    tokenizer: str | None = None
    # Context images of the adaptive patch weighting: all (released checkpoint) | others (paper text).
    context: str = "all"
    # 0-based Q-Former layers of the guidance: W_in before W-layer ``guide_in_layer`` (l),
    # W_out before Q-layer ``guide_out_layer`` (k); -1 = last layer (paper's l = k = 12).
    guide_in_layer: int = -1
    guide_out_layer: int = -1
    # Parameter groups that train; the rest is frozen and kept in eval mode. null = the variant's
    # default (SAM: patch_weight, w_in, w_out, language_projection; instructblip: language_projection).
    # Entries may also be parameter-name patterns with {a,b} braces and * wildcards
    # (sam_mllm.models.trainable), e.g. language_model.model.layers.{0,1}.self_attn.{q_proj,v_proj}.
    trainable: list[str] | None = None
    # A released LAVIS-format SAM / InstructBLIP checkpoint to convert and load on top of the backbone.
    lavis_checkpoint: str | None = None
    # Our own trained parameters (safetensors written by save_trainable / training).
    checkpoint: str | None = None
    # Weights of the frozen backbone: float32 | bfloat16 | paper (the released evaluation: ViT and LLM
    # in fp16, Q-Former, projection and SAM's layers in fp32, all under fp16 autocast; GPU only,
    # float32 on a CPU).
    dtype: str = "float32"
    attn_implementation: str = "sdpa"  # sdpa | eager
    gradient_checkpointing: bool = False  # recompute the frozen LLM's activations in backward (less memory)
    max_images: int = 8  # most images a sample may have
    # Where visual tokens enter the LLM: prefix (all images before the prompt, as released) | markers
    # (image k at the prompt's {image#k} or k-th <image> marker; sam_mllm.data.placement).
    image_placement: str = "prefix"
    # +VPG-C (model: vpgc): 0-based LLM layer whose input the re-read images update; null = the middle.
    vpgc_layer: int | None = None
    # Token budgets of LAVIS's InstructBLIP (prompt truncated from the left, answer from the right).
    max_prompt_tokens: int = 128
    max_answer_tokens: int = 256
    max_qformer_tokens: int = 128
    # Token put first in every LLM prompt, by us, whatever the tokenizer's template does: the
    # released SAM / InstructBLIP-Vicuna use "</s>" (id 2). null = the tokenizer's template as is.
    llm_bos: str | None = "</s>"
    # Evaluation prompts are passed whole, as the released generate() did; true = cut them from
    # the left to max_prompt_tokens as training does (instead of failing when one exceeds the context).
    truncate_eval_prompts: bool = False
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)


@dataclass
class GenerationConfig:
    # Released code's settings (docs/DESIGN.md §1, docs/REPRODUCING.md); paper-comparable evaluation
    # uses them. Its generate(max_length=256, min_length=1) under transformers 4.33 counted one dummy
    # BOS token: at most 255 new tokens, and no minimum (an answer may be empty).
    num_beams: int = 5
    max_new_tokens: int = 255  # most generated tokens (256 = this library's old max_length=256)
    min_new_tokens: int = 0  # fewest generated tokens (1 = this library's old min_length=1)
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0
    do_sample: bool = False


@dataclass
class DatasetConfig:
    name: str = ""
    # Registry task name: group_captioning | storytelling | change_captioning
    task: str = ""
    # Folder holding annotations.json (relative paths are resolved against the config's data_root).
    path: str = ""
    annotations: str = "annotations.json"
    # Sampling weight when several training datasets are mixed.
    weight: float = 1.0
    max_samples: int | None = None


@dataclass
class DataConfig:
    # How image files become RGB pixels: released (Image.open(path).convert("RGB"), as the released
    # code; no EXIF rotation, alpha dropped) | upright (EXIF rotation, transparency on white, 16-bit
    # scaled). Model, feature cache and HTML report all load images this way.
    image_mode: str = "released"


@dataclass
class EvalConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    batch_size: int = 4  # samples per generate call and process
    num_workers: int = 0
    # What each prediction is scored against: paper = the sample's one `output` (the converters build
    # it as DEMON built the response the paper scored against; the paper configs use it) | all =
    # every reference of the sample (`references`), the cleaner multi-reference alternative.
    references: str = "all"
    protocol: str = "paper"  # paper (the released scorer, quirks included) | clean (docs/DESIGN.md §4)
    metrics: list[str] = field(default_factory=lambda: ["rouge_l", "cider", "bleu4"])
    skip_bad: bool = False  # list bad samples and score the rest, instead of stopping at the first
    check_images: bool = True  # open every image before generating, so a bad file fails early
    # Delete predictions that a different model / checkpoint / generation setup / dataset file made
    # in the output folder and start over (by default such a folder is refused).
    restart: bool = False
    html_report: bool = True
    # SEA's Fig. 1 diagnostic: store and show each image's recalled words (the LLM input embeddings
    # nearest to its visual tokens) in predictions.jsonl and the HTML report.
    recalled_words: bool = False
    max_samples: int | None = None


@dataclass
class ParamGroupConfig:
    match: str = ""  # fnmatch glob over parameter names (model.named_parameters())
    lr_scale: float = 1.0  # times the scheduled learning rate
    weight_decay: float | None = None  # null: train.weight_decay (0 for biases and 1-D parameters)


@dataclass
class TrainConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    val_datasets: list[DatasetConfig] = field(default_factory=list)  # evaluated every eval_every steps
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    warmup_steps: int = 240
    max_steps: int = 1000  # optimizer steps
    global_batch_size: int = 20  # samples per optimizer step, over all processes and accumulation
    micro_batch_size: int = 4  # samples per forward pass and process
    grad_clip: float = 1.0
    save_every: int = 500  # steps between checkpoints (the last 3 are kept)
    eval_every: int = 0  # steps between evaluations on val_datasets; 0 = never
    log_every: int = 10  # steps between log.jsonl lines
    num_workers: int = 0
    augment: str = "random_resized_crop"  # none | random_resized_crop
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = False
    feature_cache: str | None = None  # folder caching the frozen vision features (needs augment=none)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | no | bf16
    # Experiment trackers, through accelerate: tensorboard | wandb | mlflow | comet_ml | aim | clearml |
    # dvclive | swanlab | trackio (each needs its package; WANDB_MODE=offline etc. work as usual).
    # log.jsonl and curves.png are written either way.
    log_with: list[str] = field(default_factory=list)
    resume: str | None = None  # null | latest | path to a checkpoint folder
    # Optimizer groups by parameter-name glob, first match wins, e.g. MM-Interleaved's
    # [{match: "*.sampling_offsets.*", lr_scale: 0.1, weight_decay: 0.0}, {match: "*.gate", weight_decay: 0.0}].
    param_groups: list[ParamGroupConfig] = field(default_factory=list)


@dataclass
class SEAConfig:
    """SEA's token-level alignment loss (docs/SEA.md): L = L_CE + weight * L_SEA during training."""

    # Add SEA's alignment loss to training (any model variant; nothing changes at inference).
    enabled: bool = False
    # λ of Eq. 11. The paper (v1) gives no value; 1.0 with a sweep in docs/RESULTS.md. 0 computes and
    # logs L_SEA but leaves loss and gradients bit-identical to training without SEA.
    weight: float = 1.0
    # Patch labeller: oracle (synthetic world's ground truth) | clip (transformers CLIPModel + word list).
    labeller: str = "oracle"
    # CLIP labeller: Hugging Face id or local folder (ViT-L/14 at 224 px = EVA-ViT-g's 16x16 grid).
    clip_model: str = "openai/clip-vit-large-patch14"
    # One word per line (the paper: 12dicts' 2of12, 41,242 words); null = the synthetic world's words.
    word_list: str | None = None
    top_n: int = 10  # n of Eq. 6 (paper: 10)
    # Eq. 6 scores a word by -cos (the paper, after CLIP Surgery); false scores by +cos. Scores <= 0 drop.
    negate_similarity: bool = True
    # τ is learnable as log τ. The paper's "τ = 0" cannot divide Eq. 9; read as log τ = 0 (τ = 1) at start.
    init_log_tau: float = 0.0
    min_tau: float = 0.01  # τ is clamped at 0.01, as CLIP clamps its logit scale at 100
    window: int = 2  # k of the k x k sampling window (paper: 2); exact only for perceiver=mlp
    # Q-Former perceivers: query -> patch attribution from cross-attention averaged over heads and
    # all cross-attention layers (mean) or the last layer only (last).
    attribution: str = "mean"
    # Folder of the patch-label cache (keyed by labeller + transform fingerprints, like the feature cache).
    label_cache: str = "runs/label_cache"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sea: SEAConfig = field(default_factory=SEAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Root that relative dataset paths are resolved against.
    data_root: str = "data"
    output_dir: str = "runs/default"  # everything a run writes goes here
    seed: int = 0


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults' chain: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml's errors carry line/column; keep them
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    parents = node.pop("defaults", None) or []
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(parent)).resolve(), seen + (path,)))
    return OmegaConf.merge(merged, node)


def resolve_config_path(name: str | Path) -> Path:
    """A path, or a name under ``configs/`` with or without ``.yaml``."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    for candidate in (CONFIG_ROOT / path, CONFIG_ROOT / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config {str(name)!r} not found (looked at {path} and under {CONFIG_ROOT})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (with its ``defaults`` chain) <- ``key=value`` overrides."""
    cfg, source = merge_onto_schema(Config, path, overrides)
    _validate(cfg, source)
    return cfg


def merge_onto_schema(schema_class: type, path: str | Path | None = None,
                      overrides: list[str] | None = None) -> tuple[Any, str]:
    """An instance of the dataclass ``schema_class``: its defaults <- YAML file <- ``key=value``
    overrides; also the source last merged, to name in later validation errors."""
    schema = OmegaConf.structured(schema_class)
    source = "defaults"
    try:
        if path is not None:
            resolved = resolve_config_path(path)
            source = str(resolved)
            schema = OmegaConf.merge(schema, _read_yaml(resolved))
        if overrides:
            source = f"command-line overrides {overrides}"
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
            schema = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None
    return OmegaConf.to_object(schema), source


def _explain(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


_CHOICES = {
    "model.context": ("all", "others"),
    "model.mmfs.levels": ("single", "pyramid"),
    "model.dtype": ("float32", "bfloat16", "paper"),
    "model.attn_implementation": ("sdpa", "eager"),
    "model.image_placement": ("prefix", "markers"),
    "train.augment": ("none", "random_resized_crop"),
    "train.mixed_precision": ("auto", "no", "bf16"),
    "eval.protocol": ("paper", "clean"),
    "eval.references": ("paper", "all"),
    "sea.labeller": ("oracle", "clip"),
    "sea.attribution": ("mean", "last"),
    "data.image_mode": ("released", "upright"),
}


def _validate(cfg: Config, source: str) -> None:
    for dotted, allowed in _CHOICES.items():
        *path, key = dotted.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        value = getattr(node, key)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{dotted}': {value!r} is not one of {', '.join(allowed)}")
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        raise ConfigError(
            f"{source}: train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({cfg.train.micro_batch_size})"
        )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
