"""``model.trainable`` entries: named parameter groups, or patterns over parameter names.

An entry is either a group of :meth:`SAMModel.parameter_groups` (``language_projection``, ``w_in``,
...) or a pattern over the model's parameter names. Patterns expand braces first
(``layers.{0,1}.self_attn.{q_proj,v_proj}`` is four patterns), may use shell wildcards (``*``,
``?``, ``[...]``), and select every parameter whose name matches the pattern or lies below a module
the pattern names (``...self_attn.q_proj`` selects ``...q_proj.weight`` and ``...q_proj.bias``).
Every expanded pattern must select something: a typo is an error that lists the nearest real names,
never a silently frozen layer. The selected tensors are saved in and loaded from the adapter file
like any group (``save_trainable`` writes every parameter that trains).
"""

from __future__ import annotations

import difflib
import fnmatch
import re

from torch import nn

from sam_mllm.errors import UserError

_BRACE = re.compile(r"\{([^{}]*)\}")
_WILDCARD = re.compile(r"[*?\[]")


class TrainableError(UserError, ValueError):
    """A ``model.trainable`` entry that names no group and matches no parameter."""


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a.{0,1}.{q,v}`` -> ``a.0.q, a.0.v, a.1.q, a.1.v`` (nesting allowed)."""
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise TrainableError(f"model.trainable: unbalanced braces in {pattern!r}")
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out: list[str] = []
    for choice in m.group(1).split(","):
        out.extend(expand_braces(head + choice + tail))
    return list(dict.fromkeys(out))


def is_pattern(entry: str, groups: dict) -> bool:
    """True when ``entry`` is not a group name (so it is matched against parameter names)."""
    return entry not in groups


def match_parameters(names: list[str], pattern: str) -> list[str]:
    """Parameter names selected by one brace-free pattern: the name itself or anything below it."""
    if _WILDCARD.search(pattern):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]
    return [n for n in names if n == pattern or n.startswith(pattern + ".")]


def _near(pattern: str, names: list[str], k: int = 5) -> list[str]:
    # Candidates are the parameter names and every module prefix of them, so that a misspelt module
    # path (``self_attn.q_prj``) finds ``self_attn.q_proj`` and not only its ``.weight``.
    prefixes = {n.rsplit(".", i)[0] for n in names for i in range(n.count(".") + 1)}
    return difflib.get_close_matches(pattern, sorted(prefixes), n=k, cutoff=0.6)


def resolve_trainable(model: nn.Module, entries: list[str], groups: dict[str, nn.Module | nn.Parameter],
                      where: str = "") -> tuple[set[str], set[str], set[str]]:
    """(names of the parameters that train, names of all parameters the groups cover, names of the
    modules that patterns name). Parameters outside every group are left to their owner.

    Raises :class:`TrainableError` for an entry that is neither a group nor a pattern selecting at
    least one parameter (each brace alternative must select one on its own).
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = list(by_id.values())
    modules = dict(model.named_modules())
    selected: set[str] = set()
    named_modules: set[str] = set()
    covered: set[str] = set()
    for group in groups.values():
        params = [group] if isinstance(group, nn.Parameter) else list(group.parameters())
        covered.update(by_id[id(p)] for p in params if id(p) in by_id)
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TrainableError(f"model.trainable: entries must be non-empty strings, got {entry!r}")
        if entry in groups:
            group = groups[entry]
            params = [group] if isinstance(group, nn.Parameter) else list(group.parameters())
            selected.update(by_id[id(p)] for p in params if id(p) in by_id)
            continue
        for pattern in expand_braces(entry):
            hits = match_parameters(names, pattern)
            if not hits:
                near = _near(pattern, names)
                raise TrainableError(
                    f"model.trainable: unknown group or parameter pattern {pattern!r}"
                    + (f" (from {entry!r})" if pattern != entry else "") + " matches no parameter"
                    + (f" {where}" if where else "") + f"; groups of this model: {', '.join(groups)}"
                    + (f"; nearest parameter names: {', '.join(near)}" if near else "")
                )
            selected.update(hits)
            if _WILDCARD.search(pattern):
                named_modules.update(m for m in modules if m and fnmatch.fnmatchcase(m, pattern))
            elif pattern in modules:
                named_modules.add(pattern)
    return selected, covered | selected, named_modules
