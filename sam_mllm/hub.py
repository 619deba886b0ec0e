"""Trained adapters as Hugging Face Hub models: export a run, push it, load it back by id.

An exported folder holds ``adapter.safetensors`` (the trained parameters only), ``config.yaml``
(the run's full config, minus machine paths) and ``README.md``, a model card naming the variant,
the backbone, the training config and the evaluation metrics found beside the run.
``sam_mllm.load_model("user/repo")`` or ``load_model("path/to/folder")`` rebuilds the model.

    python -m sam_mllm.hub export runs/demo/sam/final --out exported/sam-demo [--push user/sam-demo]
    python -m sam_mllm.hub push exported/sam-demo user/sam-demo

Torch-free: exporting copies files and pushing is huggingface_hub's ``upload_folder``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sam_mllm import cli
from sam_mllm.config import Config, load_config, to_yaml
from sam_mllm.errors import UserError

ADAPTER_FILE = "adapter.safetensors"  # the names sam_mllm.models.checkpoint writes
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
METRIC_KEYS = ("ROUGE_L", "CIDEr", "BLEU_4")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError):
    """An export or push that cannot be done, or a model that cannot be found locally or on the Hub."""


def is_model_folder(path: str | Path) -> bool:
    """A folder written by training or :func:`export` (an adapter and the config that built it)."""
    path = Path(path)
    return (path / ADAPTER_FILE).is_file() and (path / CONFIG_FILE).is_file()


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def locate(name_or_path: str | Path) -> Path:
    """A local model folder or adapter file as is; a Hub id (``user/repo``) from the cache or downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise HubError(f"checkpoint {name!r}: no such file or folder, and not a Hugging Face id (user/repo)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass  # not cached: download below
    try:
        return Path(snapshot_download(name, allow_patterns=[ADAPTER_FILE, CONFIG_FILE, CARD_FILE]))
    except Exception as exc:
        raise HubError(f"model {name!r} is neither a local folder nor in the Hugging Face cache, and "
                       f"downloading it failed ({type(exc).__name__}: {cli.one_line(exc)[:200]})") from exc


def find_metrics(run_folder: Path) -> dict[str, dict] | None:
    """Evaluation metrics of a run, looked for beside a checkpoint folder (``<run>/final``)."""
    run = run_folder.parent
    candidates = [run / "eval" / "metrics.json", *sorted((run / "eval").glob("step_*/metrics.json"))[-1:]]
    for path in candidates:
        if path.is_file():
            found = json.loads(path.read_text())
            if isinstance(found, dict) and all(isinstance(v, dict) for v in found.values()):
                return found
    return None


def export(checkpoint: str | Path, out: str | Path, metrics: dict[str, dict] | None = None) -> Path:
    """Write a Hub-ready folder from a training checkpoint folder (e.g. ``runs/x/final``)."""
    src, out = Path(checkpoint), Path(out)
    if not is_model_folder(src):
        raise HubError(f"{src} is not a checkpoint folder (it needs {ADAPTER_FILE} and {CONFIG_FILE}, "
                       "as training writes to <output_dir>/final)")
    cfg = load_config(src / CONFIG_FILE)
    if cfg.model.lavis_checkpoint:
        raise HubError(f"{src}: the model was built on a LAVIS checkpoint ({cfg.model.lavis_checkpoint}), which "
                       "the adapter does not contain; convert it into a backbone folder first")
    cfg.model.checkpoint = None  # the adapter travels beside the config; a machine path would not
    metrics = metrics if metrics is not None else find_metrics(src)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / ADAPTER_FILE, out / ADAPTER_FILE)
    (out / CONFIG_FILE).write_text(to_yaml(cfg))
    (out / CARD_FILE).write_text(model_card(cfg, metrics))
    return out


def model_card(cfg: Config, metrics: dict[str, dict] | None = None) -> str:
    """A model card: Hub metadata, what the model is, how to load it, its config and metrics."""
    m = cfg.model
    backbone = f"`{m.backbone}`" if m.dims is None else f"random weights of dimensions `{m.dims}`"
    meta = ["---", "library_name: sam_mllm", "tags: [sam_mllm, multi-image, instructblip]"]
    if m.dims is None and looks_like_hub_id(m.backbone):
        meta.append(f"base_model: {m.backbone}")
    meta.append("---")
    lines = [
        *meta, "",
        f"# {m.name} adapter (sam_mllm)", "",
        f"Variant `{m.name}` of sam_mllm's multi-image model on the frozen InstructBLIP backbone {backbone}: "
        f"context `{m.context}`, guidance layers l = {m.guide_in_layer}, k = {m.guide_out_layer} "
        "(0-based, -1 = last). This repository holds only the trained parameters "
        f"(`{ADAPTER_FILE}`, groups: {', '.join(m.trainable) if m.trainable else 'the variant default'}); "
        "the backbone is loaded from its own location.", "",
        "```python", "import sam_mllm", "", 'pipe = sam_mllm.load_model("<this repo id or folder>")',
        'print(pipe.generate(images=["a.png", "b.png"], prompt="What object appears in both images?"))', "```", "",
    ]
    if metrics:
        lines += ["## Evaluation", "", "| dataset | " + " | ".join(METRIC_KEYS) + " | samples |",
                  "|---|" + "---|" * (len(METRIC_KEYS) + 1)]
        for ds, s in metrics.items():
            cells = " | ".join(f"{s[k]:.2f}" if isinstance(s.get(k), (int, float)) else "-" for k in METRIC_KEYS)
            lines.append(f"| {ds} | {cells} | {s.get('num_samples', '-')} |")
        lines += ["", f"Scores x100 under the `{cfg.eval.protocol}` protocol of sam_mllm's metrics.", ""]
    t = cfg.train
    lines += ["## Training", "",
              f"{t.max_steps} steps, lr {t.lr}, global batch {t.global_batch_size}, seed {cfg.seed}, on: "
              + (", ".join(d.name or d.path for d in t.datasets) or "(not recorded)") + ".", "",
              "Full config (`config.yaml`):", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to ``repo_id`` (created if needed); returns the repo's URL."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise HubError(f"{folder} is not an exported model folder (run `python -m sam_mllm.hub export` first)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload sam_mllm adapter")
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {cli.one_line(exc)[:200]}"
        raise HubError(f"cannot push {folder} to the Hugging Face Hub as {repo_id!r}: {why} "
                       "(needs network and a token: `hf auth login` or HF_TOKEN)") from exc
    return str(url)


def build_parser():
    p = cli.parser("sam_mllm.hub", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a Hub-ready folder from a checkpoint folder")
    e.add_argument("checkpoint", help="a folder with adapter.safetensors and config.yaml, e.g. runs/x/final")
    e.add_argument("--out", required=True, help="folder to write")
    e.add_argument("--metrics", default=None,
                   help="a metrics.json ({dataset: scores}) for the card; default: the run's eval/metrics.json")
    e.add_argument("--push", default=None, metavar="USER/REPO", help="also push the folder to this Hub repo")
    e.add_argument("--private", action="store_true")
    u = sub.add_parser("push", help="upload an exported folder to the Hub")
    u.add_argument("folder")
    u.add_argument("repo_id", metavar="USER/REPO")
    u.add_argument("--private", action="store_true")
    return p


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        metrics: Any = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        folder = export(args.checkpoint, args.out, metrics)
        print(f"exported: {folder}")
        if args.push:
            print(f"pushed: {push_to_hub(folder, args.push, private=args.private)}")
    else:
        print(f"pushed: {push_to_hub(args.folder, args.repo_id, private=args.private)}")


if __name__ == "__main__":
    main()
