"""``python -m sam_mllm.train --config configs/train/....yaml [key=value ...]`` — the training recipe.

Read it top to bottom: config -> model -> data (mixture order, optional feature cache) -> optimizer
and schedule -> resume -> the loop (accumulate, clip, step, log, checkpoint, evaluate) -> final
checkpoint and curves. Only the trainable parameters are saved (a small safetensors file), plus
the resume state; both are written to a temporary folder that is flushed to disk and renamed when
complete, so a crash never damages the last good checkpoint (``sam_mllm/resume.py``). Non-finite
gradients or weights stop the run before they reach the optimizer step or a checkpoint.
"""

from __future__ import annotations

from sam_mllm import cli

if __name__ == "__main__":  # --help and config questions answer here, before torch is imported
    cli.answer_early("sam_mllm.train", __doc__)

import copy
import fnmatch
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sam_mllm.config import Config, ConfigError, to_yaml
from sam_mllm.data.feature_cache import FeatureCache, backbone_fingerprint, pixels_fingerprint
from sam_mllm.data.images import survey
from sam_mllm.data.processing import Processor, load_image
from sam_mllm.data.sampling import MixtureOrder, step_positions
from sam_mllm.data.schema import Sample, read_annotations
from sam_mllm.errors import UserError
from sam_mllm.evaluate import dataset_root, read_jsonl
from sam_mllm.models import SAMModel, build_model
from sam_mllm.models.checkpoint import save_trainable
from sam_mllm.objectives.labellers import build_label_cache, build_labeller, patch_grid
from sam_mllm.objectives.sea import SEAObjective, collate_patch_labels
from sam_mllm.resume import (
    ResumeStateError,
    complete_checkpoints,
    fsync_dir,
    latest_good_checkpoint,
    load_state,
    remove_stale,
    rng_state,
    save_state,
    set_rng_state,
)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is untouched."""


# ---------------------------------------------------------------------------------------------- data


class TrainItems(Dataset):
    """Stream position -> one training item (images or cached features, instruction, answer)."""

    def __init__(self, sets: list[tuple[Path, list[Sample]]], order: MixtureOrder, processor: Processor,
                 cfg: Config, cache: FeatureCache | None, labels: FeatureCache | None = None) -> None:
        self.sets, self.order, self.cache, self.labels = sets, order, cache, labels
        self.seed, self.image_mode = cfg.seed, cfg.data.image_mode
        self.sources = [root / ds.annotations for (root, _), ds in zip(sets, cfg.train.datasets)]  # for errors
        t = cfg.train
        self.transform = processor.transform(train=t.augment != "none", crop_scale=t.crop_scale, hflip=t.hflip)

    def __len__(self) -> int:  # positions are unbounded; the batch sampler decides which to read
        return 2**62

    def __getitem__(self, position: int) -> dict:
        d, i = self.order[position]
        root, samples = self.sets[d]
        s = samples[i]
        item = {"id": s.id, "instruction": s.instruction, "output": s.output}
        where = f"{self.sources[d]}: training sample id {s.id!r}: "
        if self.labels is not None:  # SEA's patch labels, from their cache
            item["patch_labels"] = torch.stack([self.labels.get(root / p, where) for p in s.img_list])
        if self.cache is not None:
            item["image_embeds"] = torch.stack([self.cache.get(root / p, where) for p in s.img_list])
            return item
        # Crops depend only on (seed, position): a resumed run draws exactly the same ones.
        rng = random.Random(f"{self.seed}/crop/{position}")
        item["images"] = torch.stack([self.transform(load_image(root / p, where, self.image_mode), rng)
                                      for p in s.img_list])
        return item


def load_train_sets(cfg: Config) -> tuple[list[tuple[Path, list[Sample]]], list[float]]:
    if not cfg.train.datasets:
        raise ConfigError("train.datasets is empty: name at least one training dataset")
    sets, weights = [], []
    for ds in cfg.train.datasets:
        name, _, root = dataset_root(cfg, ds)
        samples, _ = read_annotations(root / ds.annotations, max_images=cfg.model.max_images,
                                      check_images=False)
        if ds.max_samples:
            samples = samples[: ds.max_samples]
        survey(name, [root / p for s in samples for p in s.img_list], cfg.data.image_mode)
        sets.append((root, samples))
        weights.append(ds.weight)
    return sets, weights


def report_truncated_prompts(cfg: Config, processor: Processor, sets: list[tuple[Path, list[Sample]]]) -> None:
    """Once per dataset: how many training prompts are cut to model.max_prompt_tokens (from the left,
    as released). The Q-Former cuts its own tokens to model.max_qformer_tokens, so the two may then
    see different parts of the instruction."""
    for ds, (_, samples) in zip(cfg.train.datasets, sets):
        cut = sum(processor.is_truncated(s.instruction) for s in samples)
        if cut:
            print(f"{dataset_root(cfg, ds)[0]}: {cut} of {len(samples)} training prompts exceed "
                  f"model.max_prompt_tokens={processor.max_prompt_tokens} LLM tokens; their start is cut")


def build_feature_cache(cfg: Config, model: SAMModel, processor: Processor, sets, accelerator) -> FeatureCache:
    if cfg.train.augment != "none":
        raise ConfigError(
            f"train.feature_cache needs the deterministic evaluation transform, but train.augment="
            f"{cfg.train.augment!r} draws random crops: cached features would not match the pixels. "
            "Set train.augment=none, or train without the cache."
        )
    transform = processor.transform(train=False)
    mode = cfg.data.image_mode  # part of the cache key: other pixels, other features
    cache = FeatureCache(cfg.train.feature_cache, backbone_fingerprint(model), pixels_fingerprint(transform, mode))
    if accelerator.is_main_process:
        owners = {root / p: f"{root / ds.annotations}: training sample id {s.id!r}: "
                  for (root, samples), ds in zip(sets, cfg.train.datasets) for s in samples for p in s.img_list}

        @torch.no_grad()
        def encode(files: list[Path]) -> torch.Tensor:
            pixels = torch.stack([transform(load_image(f, owners[f], mode)) for f in files]).to(accelerator.device)
            return model.vision_model(pixel_values=pixels.to(model.vision_model.dtype)).last_hidden_state

        added = cache.build(list(owners), encode, where=owners)
        print(f"feature cache {cache.dir}: {added} images added, {len(cache.index['rows'])} cached")
    accelerator.wait_for_everyone()
    return FeatureCache(cfg.train.feature_cache, cache.backbone, cache.transform)  # re-read the index


def build_sea(cfg: Config, model: SAMModel, processor: Processor, sets, accelerator) -> tuple[SEAObjective, FeatureCache]:
    """SEA's objective (learnable τ) and its patch-label cache, labelled once by the main process."""
    if cfg.train.augment != "none":
        raise ConfigError(
            f"sea.enabled needs patch labels that match the pixels, but train.augment={cfg.train.augment!r} "
            "draws random crops. Set train.augment=none.")
    transform = processor.transform(train=False)
    labeller = build_labeller(cfg.sea, patch_grid(model), accelerator.device, cfg.data.image_mode)
    if accelerator.is_main_process:
        paths = [root / p for root, samples in sets for s in samples for p in s.img_list]
        cache, added = build_label_cache(cfg.sea.label_cache, labeller, transform, paths)
        print(f"label cache {cache.dir}: {added} images added, {len(cache.index['rows'])} cached")
    accelerator.wait_for_everyone()
    cache, _ = build_label_cache(cfg.sea.label_cache, labeller, transform, [])  # re-read the index
    sea = SEAObjective(labeller.words, model.llm_tokenizer, seed=cfg.seed, init_log_tau=cfg.sea.init_log_tau,
                       min_tau=cfg.sea.min_tau, window=cfg.sea.window, attribution=cfg.sea.attribution)
    return sea.to(accelerator.device), cache


class StepBatches:
    """Batch sampler: the micro-batches of this process for steps ``start, start + 1, ...``."""

    def __init__(self, start: int, max_steps: int, cfg: Config, accelerator: Accelerator) -> None:
        self.start, self.max_steps, self.t, self.acc = start, max_steps, cfg.train, accelerator

    def __iter__(self):
        for step in range(self.start, self.max_steps):
            yield from step_positions(step, self.t.global_batch_size, self.t.micro_batch_size,
                                      self.acc.process_index, self.acc.num_processes)

    def __len__(self) -> int:
        return (self.max_steps - self.start) * self.micro_batches_per_step()

    def micro_batches_per_step(self) -> int:
        return len(step_positions(0, self.t.global_batch_size, self.t.micro_batch_size,
                                  self.acc.process_index, self.acc.num_processes))


# ------------------------------------------------------------------------------------- optimisation


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to ``train.lr`` over ``warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return 0.5 * t.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: SAMModel, cfg: Config) -> torch.optim.Optimizer:
    # As in LAVIS: no weight decay on biases and 1-D parameters, unless a train.param_groups rule
    # (first matching glob) sets it; its lr_scale multiplies the schedule (see the training loop).
    t = cfg.train
    groups: dict[tuple, dict] = {  # the two default groups first, as before the rules existed
        ("decay",): {"params": [], "weight_decay": t.weight_decay, "lr_scale": 1.0},
        ("no_decay",): {"params": [], "weight_decay": 0.0, "lr_scale": 1.0},
    }
    matched = [0] * len(t.param_groups)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2
        key, group = ("decay",) if decay else ("no_decay",), None
        for i, rule in enumerate(t.param_groups):
            if fnmatch.fnmatchcase(name, rule.match):
                matched[i] += 1
                wd = rule.weight_decay if rule.weight_decay is not None else (t.weight_decay if decay else 0.0)
                key, group = (i, wd), {"params": [], "weight_decay": wd, "lr_scale": rule.lr_scale}
                break
        groups.setdefault(key, group)["params"].append(p)
    unused = [r.match for r, k in zip(t.param_groups, matched) if not k]
    if unused:
        raise ValueError(f"train.param_groups: {unused} match no trainable parameter")
    params = list(groups.values())
    return torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas))


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step_{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    # Only complete checkpoints have their final name (``.tmp`` folders never count); a newer one
    # that does not load or holds non-finite weights is named and skipped for the one before it.
    return latest_good_checkpoint(out / CHECKPOINTS)


def save_checkpoint(out: Path, step: int, model: SAMModel, optimizer, cfg: Config, keep_last: int = 3,
                    sea: SEAObjective | None = None) -> Path:
    target = checkpoint_dir(out, step)
    bad = [n for n, p in model.trainable_state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"refusing to save non-finite weights ({', '.join(bad[:3])}) at step {step}. "
                            f"The last good checkpoint is {latest_checkpoint(out) or '(none yet)'}.")
    tmp = target.with_name(target.name + ".tmp")
    state = {"step": step, "data_position": step * cfg.train.global_batch_size,
             "optimizer": optimizer.state_dict(), "rng": rng_state()}
    if sea is not None:
        state["sea"] = sea.state_dict()  # τ: training state only (SEA adds nothing at inference)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_trainable(model, tmp, config_yaml=to_yaml(cfg))
        save_state(state, tmp / STATE_FILE)
        fsync_dir(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except (OSError, RuntimeError) as exc:  # e.g. a full disk; earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise TrainingError(f"could not write checkpoint {target}: {reason}") from None
    for old in complete_checkpoints(out / CHECKPOINTS)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resume_from(cfg: Config, out: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "latest":
        found = latest_checkpoint(out)  # nothing yet: a fresh start
        if found is None and complete_checkpoints(out / CHECKPOINTS):
            print(f"train.resume=latest: no checkpoint in {out / CHECKPOINTS} loads (see above); starting at step 0")
        return found
    path = Path(cfg.train.resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume={cfg.train.resume!r}: no {STATE_FILE} in that folder")
    return path


# --------------------------------------------------------------------------------------------- main


def train(cfg: Config) -> Path:
    t = cfg.train
    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"micro_batch_size x processes ({t.micro_batch_size} x {world})")
    accum = t.global_batch_size // (t.micro_batch_size * world)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=accum,
                              cpu=not torch.cuda.is_available(), log_with=_trackers(t.log_with) or None,
                              project_config=ProjectConfiguration(str(out), logging_dir=str(out / "trackers")))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Model: frozen backbone in eval mode, trainable groups from the config.
    model = build_model(cfg.model).to(accelerator.device)
    processor = Processor.for_model(model, cfg.model)

    # Data: a deterministic mixture; pixels, or features from the on-disk cache.
    sets, weights = load_train_sets(cfg)
    if accelerator.is_main_process:
        report_truncated_prompts(cfg, processor, sets)
    cache = build_feature_cache(cfg, model, processor, sets, accelerator) if t.feature_cache else None
    # SEA (optional): L = L_CE + λ·L_SEA with patch labels from a cache and a learnable temperature.
    sea, labels = build_sea(cfg, model, processor, sets, accelerator) if cfg.sea.enabled else (None, None)
    order = MixtureOrder([len(s) for _, s in sets], weights, cfg.seed)
    items = TrainItems(sets, order, processor, cfg, cache, labels)

    optimizer = make_optimizer(model, cfg)
    if sea is not None:
        optimizer.add_param_group({"params": [sea.log_tau], "weight_decay": 0.0})
    start = 0
    resume = resume_from(cfg, out)
    if resume is not None:
        from sam_mllm.models.checkpoint import load_trainable

        try:
            state = load_state(resume / STATE_FILE)  # weights_only: a crafted file cannot run code
        except ResumeStateError as exc:
            raise TrainingError(str(exc)) from None
        load_trainable(model, resume)
        optimizer.load_state_dict(state["optimizer"])
        if sea is not None:
            sea.load_state_dict(state["sea"])
        set_rng_state(state["rng"])
        start = state["step"]
        accelerator.print(f"resumed from {resume} at step {start}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale(out / CHECKPOINTS) + remove_stale(out):  # saves cut off by a kill
            accelerator.print(f"removed the incomplete {stale}")
        (out / "config.yaml").write_text(to_yaml(cfg))
        _trim_log(out / LOG_FILE, start)  # lines past the checkpoint are redone below
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    sampler = StepBatches(start, t.max_steps, cfg, accelerator)
    def collate(b: list[dict]) -> dict:
        batch = processor.collate(b, with_answers=True)
        if sea is not None:
            batch["patch_labels"] = collate_patch_labels(b)
        return batch

    loader = DataLoader(items, batch_sampler=sampler, num_workers=t.num_workers, collate_fn=collate)
    trackers = accelerator if t.log_with else None
    if trackers is not None:
        accelerator.init_trackers(out.name or "sam_mllm", config=_flat_config(cfg),
                                  init_kwargs={"wandb": {"dir": str(out), "name": out.name}})
    bar = tqdm(total=t.max_steps, initial=start, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    log = open(out / LOG_FILE, "a", encoding="utf-8") if accelerator.is_main_process else None
    micro = sampler.micro_batches_per_step()
    outside = {"sea.log_tau": sea.log_tau} if sea is not None else None  # trained, not in the model
    batches = iter(loader)
    tick, samples_seen = time.monotonic(), 0
    try:
        for step in range(start, t.max_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
            step_loss = torch.zeros((), device=accelerator.device)
            step_parts = torch.zeros(4, device=accelerator.device)  # SEA: loss_ce, loss_sea, pairs, accuracy
            for _ in range(micro):
                batch = next(batches)
                ids = batch.pop("ids")
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    output = model(batch)
                    loss = output.loss
                    if sea is not None:
                        aux = sea(raw, batch, output.perception, ids, step)
                        loss = loss + cfg.sea.weight * aux.loss
                        step_parts += torch.tensor([output.loss.item(), aux.loss.item(), aux.num_pairs,
                                                    aux.accuracy], device=step_parts.device) / micro
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"non-finite loss ({loss.item()}) at step {step + 1} on samples {ids}; stopping. "
                            f"The last good checkpoint is {latest_checkpoint(out) or '(none yet)'}.")
                    accelerator.backward(loss)
                    if sea is not None and accelerator.sync_gradients and accelerator.num_processes > 1:
                        sea.log_tau.grad = accelerator.reduce(sea.log_tau.grad, reduction="mean")  # τ is not in DDP
                    if accelerator.sync_gradients:  # a non-finite gradient must not reach the weights
                        _stop_if_non_finite(raw, "gradient", step, ids, out, extra=outside)
                    if accelerator.sync_gradients and t.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(raw.trainable_state_dict().values(), t.grad_clip)
                        _stop_if_non_finite(raw, "gradient", step, ids, out, norm=grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        _stop_if_non_finite(raw, "weight", step, ids, out, extra=outside)
                step_loss += loss.detach() / micro
                samples_seen += len(ids) * accelerator.num_processes
            done = step + 1
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            bar.update(1)
            if done % t.log_every == 0 or done == t.max_steps:
                elapsed = time.monotonic() - tick
                record = {"step": done, "loss": mean_loss, "lr": lr_at(step, cfg),
                          "grad_norm": float(grad_norm) if t.grad_clip > 0 else None,
                          "samples_per_sec": samples_seen / max(elapsed, 1e-9)}
                if sea is not None:
                    parts = accelerator.reduce(step_parts, reduction="mean").tolist()
                    record.update(loss_ce=parts[0], loss_sea=parts[1], sea_pairs=parts[2], sea_accuracy=parts[3],
                                  tau=float(sea.tau.detach()))
                tick, samples_seen = time.monotonic(), 0
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}",
                                sps=f"{record['samples_per_sec']:.1f}")
                _log(log, trackers, record)
            if done % t.save_every == 0 or done == t.max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(out, done, raw, optimizer, cfg, sea=sea)
            if t.eval_every and t.val_datasets and (done % t.eval_every == 0 or done == t.max_steps):
                _log(log, trackers, {"step": done, **_periodic_eval(cfg, raw, accelerator, out, done)})
                model.train()
        # Data-parallel replicas must end equal; a silent divergence would make the checkpoint
        # (written by the main process alone) unrepresentative of the run.
        flat = torch.cat([p.detach().float().flatten() for p in raw.trainable_state_dict().values()])
        gathered = accelerator.gather(flat[None])
        identical = bool((gathered == gathered[:1]).all())
        _log(log, trackers, {"step": t.max_steps, "replicas_identical": identical})
        if not identical:
            raise TrainingError("data-parallel replicas ended with different trainable weights")
    finally:
        bar.close()
        if log is not None:
            log.close()
        if trackers is not None:
            accelerator.end_training()

    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        last = latest_checkpoint(out)
        tmp = out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in ("adapter.safetensors", "config.yaml"):
            shutil.copy2(last / name, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        from sam_mllm.report import plot_curves

        plot_curves(out / LOG_FILE, out / "curves.png", title=f"{out} ({cfg.model.name})")
    return final


def _periodic_eval(cfg: Config, model: SAMModel, accelerator: Accelerator, out: Path, step: int) -> dict:
    from sam_mllm.evaluate import evaluate

    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.eval.datasets = list(cfg.train.val_datasets)
    results = evaluate(eval_cfg, model=model, accelerator=accelerator, out_dir=out / "eval" / f"step_{step:07d}")
    return {f"eval/{ds}/{k}": v for ds, summary in results.items() for k, v in summary.items()
            if isinstance(v, (int, float)) and not k.startswith("num_")}


def _stop_if_non_finite(model: SAMModel, what: str, step: int, ids: list, out: Path, norm=None,
                        extra: dict[str, torch.nn.Parameter] | None = None) -> None:
    """Stop on non-finite gradients or weights (or a gradient norm that overflowed, which clipping
    would turn into a zero or NaN update), naming the newest checkpoint that is finite. ``extra``:
    trained parameters outside the model (SEA's τ)."""
    if norm is not None:
        bad = [] if torch.isfinite(torch.as_tensor(norm)) else [f"total norm {float(norm)}"]
    else:
        params = {**model.trainable_state_dict(), **(extra or {})}
        values = [p.grad if what == "gradient" else p for p in params.values()]
        bad = [n for n, v in zip(params, values) if v is not None and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"non-finite {what}s ({', '.join(bad[:3])}) at step {step + 1} (last micro-batch: samples {ids}); "
            f"stopping before they are saved. The last good checkpoint is {latest_checkpoint(out) or '(none yet)'}.")


def _trim_log(path: Path, step: int) -> None:
    records = [r for r in read_jsonl(path, repair=True) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _log(file, trackers: Accelerator | None, record: dict) -> None:
    if file is None:
        return
    file.write(json.dumps(record) + "\n")
    file.flush()
    if trackers is not None:
        trackers.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                     step=record["step"])


def _trackers(names: list[str]) -> list[str]:
    """``train.log_with`` checked against accelerate's trackers and the installed packages."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(x) for x in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; accelerate's trackers: "
                              f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:  # accelerate would skip it without a word
            raise ConfigError(f"train.log_with: tracker {name!r} needs its package, which is not installed "
                              f"(pip install {name}, or pip install 'sam_mllm[tracking]')")
    return list(names)


def _flat_config(cfg: Config) -> dict:
    """The config as flat ``section.key`` scalars, the form every tracker accepts as hyperparameters."""
    from omegaconf import OmegaConf

    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse_config(argv, "sam_mllm.train", __doc__)
    final = train(cfg)
    print(f"trained parameters: {final}")


if __name__ == "__main__":
    main()
