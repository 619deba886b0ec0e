"""Hub-native adapters: export a trained run, load it back by folder or Hub id, push fails clearly offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sam_mllm
from sam_mllm import hub
from sam_mllm.config import load_config, to_yaml
from sam_mllm.models import checkpoint as ckpt_module
from sam_mllm.models.checkpoint import save_trainable

REPO = Path(__file__).resolve().parents[1]
GEN = dict(num_beams=1, max_new_tokens=8)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A "trained" demo model (the embedded backbone, perturbed SAM weights), saved as training saves it."""
    run = tmp_path_factory.mktemp("hub") / "run"
    pipe = sam_mllm.load_model("demo/sam", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.trainable_state_dict().values():
            p.add_(torch.randn_like(p) * 0.05)
    save_trainable(pipe.model, run / "final", config_yaml=to_yaml(pipe.cfg))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"synthetic_group_captioning": {"ROUGE_L": 51.25, "CIDEr": 80.5, "BLEU_4": 12.0, "num_samples": 40}}))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    return run, pipe, images


def test_export_then_load_generates_identically(trained_run, tmp_path, monkeypatch):
    run, pipe, images = trained_run
    folder = hub.export(run / "final", tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors", "config.yaml"]
    card = (folder / "README.md").read_text()
    assert "# sam adapter" in card and "sam_mllm/assets/tiny_backbone" in card
    assert "| synthetic_group_captioning | 51.25 | 80.50 | 12.00 | 40 |" in card and "```yaml" in card
    assert "checkpoint: null" in (folder / "config.yaml").read_text()  # no machine path travels

    expected = pipe.generate(images, "what object is in both images ?", **GEN)
    assert expected.strip()
    loaded = sam_mllm.load_model(str(folder), device="cpu")
    for name, value in pipe.model.trainable_state_dict().items():
        assert torch.equal(loaded.model.trainable_state_dict()[name], value), name
    assert loaded.generate(images, "what object is in both images ?", **GEN) == expected

    # A Hub id resolves through huggingface_hub's snapshot (faked here: no network in tests).
    calls = []

    def snapshot(repo_id, **kw):
        calls.append((repo_id, kw.get("local_files_only", False)))
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    by_id = sam_mllm.load_model("someone/sam-demo", device="cpu")
    assert calls[0] == ("someone/sam-demo", True)
    assert by_id.generate(images, "what object is in both images ?", **GEN) == expected
    assert hub.ADAPTER_FILE == ckpt_module.ADAPTER_FILE and hub.CONFIG_FILE == ckpt_module.CONFIG_FILE


def test_a_shipped_config_name_is_not_taken_for_a_hub_id():
    assert not sam_mllm.api._names_a_model("demo/sam") and sam_mllm.api._names_a_model("someone/sam-demo")
    assert load_config("demo/sam").model.name == "sam"


def test_push_offline_fails_in_one_line(trained_run, tmp_path):
    run, _, _ = trained_run
    folder = hub.export(run / "final", tmp_path / "export")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "sam_mllm.hub", "push", str(folder), "someone/sam-demo"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0] and "someone/sam-demo" in lines[0]
