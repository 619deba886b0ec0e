"""The command line: user errors in one line with exit code 2, fast torch-free help, config questions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_dataset

from sam_mllm import cli, evaluate, train
from sam_mllm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

# Runs an entry module as `python -m` does and reports whether torch got imported.
_PROBE = """
import runpy, sys
sys.argv = [{module!r}, *{args!r}]
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("TORCH_LOADED=" + str("torch" in sys.modules), "EXIT=" + str(code))
"""


@pytest.mark.parametrize("module", ["sam_mllm.train", "sam_mllm.evaluate", "sam_mllm.bench", "sam_mllm.demo"])
def test_help_names_the_command_and_does_not_import_torch(module):
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(module=module, args=["--help"])],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_LOADED=False EXIT=0" in proc.stdout
    assert f"usage: python -m {module}" in proc.stdout
    assert "``" not in proc.stdout and "--debug" in proc.stdout


def test_config_help_lists_keys_with_defaults_and_docs():
    text = cli.config_parser("sam_mllm.train", train.__doc__).format_help()
    assert "model.name = sam" in text and "Registry name of the variant" in text
    assert "train.lr = 2e-05" in text and "eval.datasets = []" in text
    # The whole description, not its first line only.
    assert "never damages the last good checkpoint" in text


def test_show_config_and_list_configs(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "demo/sam", "model.context=others", "--show-config"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert "context: others" in shown and "tiny_backbone" in shown  # merged: file, its defaults, override
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--list-configs"])
    listed = capsys.readouterr().out
    assert e.value.code == 0 and "demo/sam " in listed and "eval/clevr_change " in listed


def _one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_user_errors_exit_2_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    data = tmp_path / "tiny"
    write_dataset(data, n=3)
    base = ["model.dims=tiny", f"data_root={tmp_path}", f"output_dir={tmp_path / 'out'}",
            "eval.datasets=[{name: tiny, task: group_captioning, path: tiny}]"]
    # bad config key, bad value, unknown registry name, missing config file
    assert "model.contxt" in _one_line_error(capsys, train.main, ["model.contxt=all"])
    assert "model.context" in _one_line_error(capsys, evaluate.main, [*base, "model.context=mine"])
    assert "unknown model 'bogus'" in _one_line_error(capsys, evaluate.main, [*base, "model.name=bogus"])
    assert "not found" in _one_line_error(capsys, train.main, ["--config", "no/such/config"])
    # no datasets at all (evaluate without --config)
    assert "--config" in _one_line_error(capsys, evaluate.main, [])
    # missing weights
    missing = tmp_path / "no_weights"
    assert str(missing) in _one_line_error(capsys, evaluate.main, ["model.backbone=" + str(missing), *base[1:]])
    # missing data
    assert "annotations file not found" in _one_line_error(capsys, evaluate.main,
                                                           [*base[:1], f"data_root={tmp_path / 'nowhere'}", *base[2:]])
    # a bad sample: named by its index and id
    ann = json.loads((data / "annotations.json").read_text())
    ann[1]["img_list"] = []
    (data / "annotations.json").write_text(json.dumps(ann))
    assert "id 1" in _one_line_error(capsys, evaluate.main, base).replace("'", "")


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(UserError):
        train.main(["model.contxt=all", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(UserError):
        train.main(["model.contxt=all"])


def test_hub_download_failure_is_one_line(monkeypatch):
    import huggingface_hub

    from sam_mllm.models import backbone

    def fail(repo_id, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise OSError("Name or service not known\nAn error happened while trying to locate the files\nretry")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(backbone.BackboneNotFoundError) as e:
        backbone._locate("someone/missing-model")
    assert "\n" not in str(e.value) and "Name or service not known" in str(e.value)
    assert "model.dims=tiny" in str(e.value)


def test_the_process_exits_2_without_traceback():
    # The torch-free route (a config question) keeps the test quick; main() is covered above.
    proc = subprocess.run([sys.executable, "-m", "sam_mllm.evaluate", "--show-config", "model.context=mine"],
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "model.context" in proc.stderr and "Traceback" not in proc.stderr
