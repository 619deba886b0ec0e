"""``python -m sam_mllm.data.mmlink --config FILE [key=value ...]``: write or continue an MmLINK run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from sam_mllm.config import ConfigError
from sam_mllm.data.mmlink.config import load_mmlink_config
from sam_mllm.data.mmlink.models import MissingWeightsError
from sam_mllm.data.mmlink.pipeline import run
from sam_mllm.data.mmlink.stages import PipelineError


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file or a name under configs/ (e.g. mmlink/procedural)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_samples=10 inpainter.steps=20")
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        summary = run(load_mmlink_config(args.config, args.overrides))
    except (ConfigError, PipelineError, MissingWeightsError) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(asdict(summary), indent=1))
    print(f"done in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
