"""Configs fail at load time with the key path named; the registry names what it has."""

from __future__ import annotations

import pytest

from sam_mllm import registry
from sam_mllm.config import ConfigError, load_config


def test_defaults_match_the_paper():
    cfg = load_config()
    assert cfg.model.name == "sam" and cfg.model.context == "all"
    assert (cfg.model.guide_in_layer, cfg.model.guide_out_layer) == (-1, -1)
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.warmup_steps, t.global_batch_size) == (2e-5, [0.9, 0.999], 0.05, 240, 20)
    assert not t.hflip
    g = cfg.generation
    assert (g.num_beams, g.max_new_tokens, g.min_new_tokens, g.repetition_penalty, g.length_penalty) == (5, 255, 0, 1.5, 1.0)


def test_paper_eval_configs_score_against_the_paper_reference():
    from sam_mllm.config import CONFIG_ROOT

    for path in sorted((CONFIG_ROOT / "eval").glob("*.yaml")):
        assert load_config(path).eval.references == "paper", path.name
    assert load_config().eval.references == "all"


def test_yaml_defaults_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  name: instructblip\ntrain:\n  lr: 1.0e-4\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrain:\n  max_steps: 7\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.context=others", "train.micro_batch_size=5"])
    assert cfg.model.name == "instructblip" and cfg.train.lr == 1e-4 and cfg.train.max_steps == 7
    assert cfg.model.context == "others" and cfg.train.micro_batch_size == 5


@pytest.mark.parametrize(
    "text,overrides,message",
    [("model:\n  contxt: all\n", [], "model.contxt"),
     ("train:\n  max_steps: many\n", [], "train.max_steps"),
     ("", ["model.context=some"], "model.context"),
     ("", ["eval.references=first"], "eval.references"),
     ("", ["train.lr"], "not of the form key=value"),
     ("", ["eval.datasets=3"], "eval.datasets"),
     ("model: [1, 2\n", [], "cannot parse YAML"),
     ("", ["train.global_batch_size=10", "train.micro_batch_size=3"], "multiple")],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/config.yaml")


def test_registry_duplicates_and_unknown_names():
    @registry.register("metric", "_test_metric")
    def metric():
        return 1

    registry.register("metric", "_test_metric")(metric)  # the same object again is harmless
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("metric", "_test_metric")(lambda: 2)
    with pytest.raises(registry.RegistryError, match="unknown metric 'nope'; registered metrics: .*_test_metric"):
        registry.get("metric", "nope")
    with pytest.raises(registry.RegistryError, match="unknown registry kind"):
        registry.register("widget", "x")
