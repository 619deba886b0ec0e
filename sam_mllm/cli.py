"""What every ``python -m sam_mllm.<command>`` shares: its parser, its help, and its way of failing.

- A user error (any :class:`~sam_mllm.errors.UserError`: a bad config key, an unknown registry
  name, missing weights or data, a bad sample) is printed as one ``error: ...`` line on stderr
  with exit code 2 and no traceback; ``--debug`` or ``SAM_MLLM_DEBUG=1`` shows the traceback.
- ``--help`` names the command as it is typed (``python -m sam_mllm.train``), shows the module's
  whole description and, for config-driven commands, every config key with its default and doc.
- ``--show-config`` prints the merged, validated config; ``--list-configs`` the shipped ones.

This module imports neither torch nor transformers: the entry points call :func:`answer_early`
before their heavy imports, so help and config questions answer in well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sam_mllm.errors import UserError

DEBUG_ENV = "SAM_MLLM_DEBUG"
# Options answered without running anything (and so without importing torch).
LIGHT_OPTIONS = ("-h", "--help", "--show-config", "--list-configs")

F = TypeVar("F", bound=Callable[..., Any])


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among the arguments, or ``SAM_MLLM_DEBUG`` set to a true value."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (YAML and OS errors span several)."""
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(parts) or type(exc).__name__


def entry_point(main: F) -> F:
    """Decorate a ``main(argv=None)``: user errors become one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return main(argv, *args, **kwargs)
        except UserError as exc:
            if debug_requested(argv):
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def describe(doc: str | None) -> str:
    """A module docstring as plain help text: dedented, reStructuredText backticks removed."""
    return _plain(inspect.cleandoc(doc or ""))


def _plain(text: str) -> str:
    return re.sub(r"``(.+?)``", r"\1", text).replace(":func:", "").replace(":class:", "")


def parser(module: str, doc: str | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser named as the command is typed, with the module's description and ``--debug``."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=describe(doc), epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
    return p


def config_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a config-driven command: ``--config FILE key=value ...`` plus the light options."""
    p = parser(module, doc, epilog=config_reference())
    p.add_argument("--config", default=None,
                   help="a YAML file, or a name under configs/ such as eval/clevr_change (see --list-configs)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.context=others train.max_steps=100 (keys below)")
    p.add_argument("--show-config", action="store_true",
                   help="print the merged, validated config (file <- overrides) as YAML and exit")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    return p


def parse_config(argv: Sequence[str] | None, module: str, doc: str | None):
    """Parse a config-driven command line; answers ``--show-config``/``--list-configs`` and exits."""
    from sam_mllm.config import load_config, to_yaml

    args = config_parser(module, doc).parse_args(argv)
    if args.list_configs:
        print(list_configs())
        raise SystemExit(0)
    cfg = load_config(args.config, args.overrides)
    if args.show_config:
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def answer_early(module: str, doc: str | None = None,
                 build_parser: Callable[[], argparse.ArgumentParser] | None = None) -> None:
    """Answer help and config questions before the caller imports torch; otherwise return at once.

    Called at the top of an entry module under ``if __name__ == "__main__"``. Config-driven
    commands pass their docstring; others pass a torch-free ``build_parser``.
    """
    argv = sys.argv[1:]
    if not any(a in LIGHT_OPTIONS for a in argv):
        return
    if build_parser is not None:
        entry_point(lambda a: build_parser().parse_args(a))(argv)
    else:
        entry_point(lambda a: parse_config(a, module, doc))(argv)
    raise SystemExit(0)


# ---------------------------------------------------------------------------------- config reference


def _field_docs(cls: type) -> dict[str, str]:
    """Field -> its comment in the dataclass source: the comment lines above it plus an inline ``# ...``.

    A comment above a run of fields with one name prefix (``guide_in_layer``, ``guide_out_layer``)
    documents all of them.
    """
    docs: dict[str, str] = {}
    block: list[str] = []
    block_prefix = None
    reading_comment = False
    for line in inspect.getsource(cls).splitlines()[1:]:
        s = line.strip()
        if s.startswith("#"):
            block = block if reading_comment else []
            block.append(s.lstrip("#").strip())
            block_prefix, reading_comment = None, True
            continue
        reading_comment = False
        m = re.match(r"([A-Za-z_]\w*)\s*:", s)
        if not m:
            block = []
            continue
        name = m.group(1)
        inline = s.split("  # ", 1)[1].strip() if "  # " in s else ""
        prefix = name.split("_")[0]
        if block_prefix is None:
            block_prefix = prefix
        shared = block if prefix == block_prefix else []
        docs[name] = _plain(" ".join([*shared, inline]).strip())
        if prefix != block_prefix:
            block = []
    return docs


def config_keys(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) of every config key, in schema order."""
    if cls is None:
        from sam_mllm.config import Config

        cls = Config
    docs = _field_docs(cls)
    out: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out.extend(config_keys(type(default), f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", default, docs.get(f.name, "")))
    return out


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return str(v) if v != "" else "''"


def config_reference(width: int = 100) -> str:
    """The config keys with their defaults and docs, as shown at the end of ``--help``."""
    lines = ["config keys (override as key=value; defaults shown; a dataset entry has the keys "
             "name, task, path, annotations, weight, max_samples):"]
    for key, default, doc in config_keys():
        lines.append(f"  {key} = {_yaml_value(default)}")
        if doc:
            lines.extend(textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      "))
    lines.append(f"Errors print one line and exit with code 2; --debug or {DEBUG_ENV}=1 shows the traceback.")
    return "\n".join(lines)


def list_configs() -> str:
    """The shipped configs by name (what ``--config`` accepts), each with its first comment line."""
    from sam_mllm.config import CONFIG_ROOT

    lines = [f"configs under {CONFIG_ROOT} (pass --config NAME):"]
    for path in sorted(CONFIG_ROOT.rglob("*.yaml")):
        rel = path.relative_to(CONFIG_ROOT).with_suffix("").as_posix()
        if rel.startswith("accelerate/"):
            continue  # accelerate's own launch configs, not ours
        first = next((ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        lines.append(f"  {rel:<28} {first}")
    lines.append("launch configs for `accelerate launch --config_file`: "
                 + ", ".join(sorted(p.name for p in (CONFIG_ROOT / "accelerate").glob("*.yaml"))))
    return "\n".join(lines)
