"""Instruction tuning for the tiny backbone, InstructBLIP's held-in/held-out protocol in miniature.

InstructBLIP (Dai et al., 2023) instruction-tunes BLIP-2 on many tasks, each asked in many
phrasings, and measures instruction generalisation on held-out data. Here the tasks are single-image
questions about a synthetic scene (``sam_mllm.data.synthetic``): describe, colour, shape, pattern,
background, count, yes/no, listing, position, referring to an object by an attribute, and a short
multi-sentence description. Each task has training phrasings and **held-out phrasings**; two more
tasks are **held out** whole. Held-out phrasings and tasks appear only in the evaluation files of
the ``instruct`` test split, never in a training split:

- ``annotations.json``: one held-in task per image, asked with a training phrasing;
- ``annotations_heldout_phrasing.json``: the same images and tasks, asked with a held-out phrasing;
- ``annotations_heldout_task.json``: the same images, asked a held-out task.

Every split's ``tasks.json`` names the task of each sample, ``{annotation file: {id: task}}``.

No phrasing uses the zero-shot tasks' own words (group captioning's "sum", "common", "factor",
"statement"; change captioning's "difference"; storytelling's "story"), so those stay unseen by
the backbone too; and every word of a held-out phrasing also occurs in a training phrasing, so a
held-out score measures new combinations of known words, not unknown tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Held-out annotation files of the ``instruct`` test split (besides annotations.json).
HELDOUT_FILES = {"heldout_phrasing": "annotations_heldout_phrasing.json",
                 "heldout_task": "annotations_heldout_task.json"}
# Words of the zero-shot evaluation tasks' instructions that instruction tuning must not teach.
ZERO_SHOT_WORDS = frozenset({"sum", "common", "factor", "statement", "difference", "story", "stories"})


@dataclass(frozen=True)
class InstructionTask:
    name: str
    train: tuple[str, ...]  # phrasings used in training splits
    heldout: tuple[str, ...]  # phrasings used only by annotations_heldout_phrasing.json


TASKS: tuple[InstructionTask, ...] = (
    InstructionTask("describe", (
        "Describe the image.", "What does this image show?", "Write a short description of the picture.",
        "What can you see in this picture?", "Give a short caption for the image.", "Describe what is in this photo.",
        "Caption this image.", "Tell me what the picture shows.", "Briefly describe the image.",
        "What is shown in the image?"),
        ("Write a caption for this photo.", "Tell me what you see in the image.")),
    InstructionTask("colour", (
        "What is the colour of the {shape}?", "What colour is the {shape}?", "Which colour does the {shape} have?",
        "Tell me the colour of the {shape}.", "The {shape} is what colour?", "Name the colour of the {shape}.",
        "What colour does the {shape} have?", "Say the colour of the {shape}."),
        ("Which colour is the {shape}?", "Give the colour of the {shape}.")),
    InstructionTask("shape", (
        "What shape is {colour}?", "What shape is the {colour} object?", "Which shape is {colour}?",
        "Name the shape of the {colour} object.", "What is the shape of the {colour} object?",
        "Tell me the shape of the {colour} thing.", "The {colour} object has what shape?",
        "Say the shape of the {colour} thing."),
        ("Which shape does the {colour} object have?", "Give the shape of the {colour} thing.")),
    InstructionTask("pattern", (
        "What pattern does the {colour} {shape} have?", "What is the pattern of the {colour} {shape}?",
        "Is the {colour} {shape} plain, striped, dotted or checkered?", "Which pattern is on the {colour} {shape}?",
        "Name the pattern of the {colour} {shape}.", "Tell me the pattern of the {colour} {shape}.",
        "How is the {colour} {shape} painted?", "Say the pattern of the {colour} {shape}."),
        ("Give the pattern of the {colour} {shape}.", "Which pattern does the {colour} {shape} have?")),
    InstructionTask("background", (
        "What is the background?", "Where was this picture taken?", "What is behind the objects?",
        "Name the background of the image.", "Which background does the image have?", "Tell me the background.",
        "What is the setting of this photo?", "Say what the background is."),
        ("Give the background of the picture.", "What background does this photo have?")),
    InstructionTask("count", (
        "How many objects are there?", "How many things are in the image?", "Count the objects.",
        "How many objects can you see?", "What is the number of objects in the picture?",
        "Count the things in this photo.", "Tell me how many objects there are.",
        "Say how many things the image shows."),
        ("How many objects does this picture show?", "Give the number of things in the image.")),
    InstructionTask("exists", (
        "Is there a {name}?", "Is there a {name} in the image?", "Can you see a {name}?",
        "Does the picture show a {name}?", "Is a {name} in this photo?", "Does this image have a {name}?",
        "Answer yes or no: is there a {name}?", "Tell me if there is a {name}."),
        ("Can you see a {name} in the picture?", "Does the image show a {name}?")),
    InstructionTask("list", (
        "List the objects.", "List the objects in the image.", "Name every object in the picture.",
        "What objects are there?", "Which objects can you see?", "Name all the things in this photo.",
        "Tell me the objects in the image.", "Say which objects the picture shows."),
        ("Give a list of the objects.", "Which things are in the image?")),
    InstructionTask("position", (
        "What is on the {side}?", "Which object is on the {side}?", "Name the object on the {side}.",
        "What is the object on the {side}?", "Tell me what is on the {side}.",
        "Which thing is on the {side} of the image?", "Describe the object on the {side}.",
        "Say what is on the {side}."),
        ("What thing is on the {side} of the picture?", "Give the object on the {side}.")),
    InstructionTask("refer", (
        "Describe the {shape}.", "What is the {shape} like?", "Describe the {shape} in the image.",
        "Tell me about the {shape}.", "What does the {shape} look like?", "Give a short description of the {shape}.",
        "Name the {shape} in full.", "Say what the {shape} looks like."),
        ("Describe the {shape} in this picture.", "What does the {shape} in the image look like?")),
    InstructionTask("detail", (
        "Describe the image in detail.", "Write a detailed description of the picture.",
        "Give a long description of this photo.", "Describe everything in the image.",
        "Tell me about this picture in detail.", "What is in the image? Answer in detail.",
        "Write a few sentences about the image.", "Describe this photo in a few sentences."),
        ("Give a detailed description of the image.", "Tell me everything about this picture.")),
)
# Tasks never trained on: each combines skills of the held-in tasks (background with an object;
# position with colour). Only annotations_heldout_task.json asks them.
HELDOUT_TASKS: tuple[InstructionTask, ...] = (
    InstructionTask("where", (), ("Where is the {name}?", "Where can you see the {name}?",
                                  "Tell me where the {name} is.")),
    InstructionTask("side_colour", (), ("What colour is the object on the {side}?",
                                        "Which colour does the thing on the {side} have?",
                                        "Tell me the colour of the object on the {side}.")),
)
TASK_NAMES = tuple(t.name for t in TASKS)


def phrasings(split: str = "train") -> list[str]:
    """Every template of ``split``: ``train`` (held-in tasks' training phrasings), ``heldout_phrasing``
    or ``heldout_task``."""
    if split == "train":
        return [p for t in TASKS for p in t.train]
    if split == "heldout_phrasing":
        return [p for t in TASKS for p in t.heldout]
    if split == "heldout_task":
        return [p for t in HELDOUT_TASKS for p in t.heldout]
    raise ValueError(f"unknown phrasing split {split!r}; choose train, heldout_phrasing or heldout_task")


def vocabulary_texts() -> list[str]:
    """Every phrasing and answer word, for the tokenisers' closed vocabulary."""
    return [*phrasings("train"), *phrasings("heldout_phrasing"), *phrasings("heldout_task"),
            "plain striped dotted checkered there is are objects object it on in the middle left right"]


# ----------------------------------------------------------------------------------- answers

def _listing(names: list[str]) -> str:
    """'a red circle', 'a red circle and a blue star', 'a red circle, a ... and a ...'."""
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def _answer(task: str, scene: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """Template fields and the answer of ``task`` on ``scene`` (objects left to right, context)."""
    from sam_mllm.data.synthetic import COLOURS, CONTEXTS, NUMBER_WORDS, PATTERNS, SHAPES, object_name

    objs: list[tuple[str, str, str]] = scene["objects"]  # left to right
    names = [object_name(*o) for o in objs]
    ctx = scene["context"]
    target = objs[int(rng.integers(len(objs)))]
    side = ("left", "right")[int(rng.integers(2))]
    at_side = objs[0] if side == "left" else objs[-1]
    if task == "describe":
        return {}, f"{_listing(names)} {CONTEXTS[ctx]}."
    if task == "colour":
        return {"shape": target[0]}, f"{target[1]}."
    if task == "shape":
        return {"colour": target[1]}, f"{target[0]}."
    if task == "pattern":
        return {"colour": target[1], "shape": target[0]}, f"{target[2]}."
    if task == "background":
        return {}, f"{ctx}."
    if task == "count":
        return {}, f"{NUMBER_WORDS[len(objs)]}."
    if task == "exists":
        if rng.random() < 0.5:
            return {"name": object_name(*target)}, "yes."
        present = {o[:2] for o in objs}
        while True:  # an absent object whose colour-shape pair is also absent: the answer is unambiguous
            o = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                 PATTERNS[rng.integers(len(PATTERNS))])
            if o[:2] not in present:
                return {"name": object_name(*o)}, "no."
    if task == "list":
        return {}, f"{_listing(names)}."
    if task == "position":
        return {"side": side}, f"a {object_name(*at_side)}."
    if task == "refer":
        return {"shape": target[0]}, f"a {object_name(*target)}."
    if task == "detail":
        n = len(objs)
        if n == 1:
            return {}, f"there is one object {CONTEXTS[ctx]}. it is a {names[0]}."
        places = ["on the left", "on the right"] if n == 2 else ["on the left", "in the middle", "on the right"]
        body = " ".join(f"{p} is a {nm}." for p, nm in zip(places, names))
        return {}, f"there are {NUMBER_WORDS[n]} objects {CONTEXTS[ctx]}. {body}"
    if task == "where":
        return {"name": object_name(*target)}, f"{CONTEXTS[ctx]}."
    if task == "side_colour":
        return {"side": side}, f"{at_side[1]}."
    raise ValueError(f"unknown instruction task {task!r}")


def _ask(task: InstructionTask, templates: tuple[str, ...], scene: dict, rng: np.random.Generator,
         phrasing: np.random.Generator) -> dict:
    fields, answer = _answer(task.name, scene, rng)
    template = templates[int(phrasing.integers(len(templates)))]
    return {"instruction": template.format(**fields), "output": answer, "task": task.name}


def instruction_records(scene: dict, split: str, rng: np.random.Generator,
                        phrasing: np.random.Generator) -> dict[str, dict]:
    """The records of one image: ``{"annotations": ...}`` for a training split; for ``test`` also
    ``heldout_phrasing`` (same task and answer, a held-out phrasing) and ``heldout_task``.

    ``scene`` is ``{"objects": [(shape, colour, pattern), ...] left to right, "context": name}``;
    ``rng`` draws what is asked, ``phrasing`` only how it is phrased.
    """
    task = TASKS[int(rng.integers(len(TASKS)))]
    state = rng.bit_generator.state
    out = {"annotations": _ask(task, task.train, scene, rng, phrasing)}
    if split == "test":
        rng.bit_generator.state = state  # the same fields and answer, asked another way
        out["heldout_phrasing"] = _ask(task, task.heldout, scene, rng, phrasing)
        other = HELDOUT_TASKS[int(rng.integers(len(HELDOUT_TASKS)))]
        out["heldout_task"] = _ask(other, other.heldout, scene, rng, phrasing)
    return out


def answer_form(task: str) -> re.Pattern:
    """What a well-formed answer to ``task`` looks like, whatever the scene: a colour word for
    ``colour``, "yes." or "no." for ``exists``, a list of object names for ``list``... A backbone that
    follows an instruction answers in its form even where it misperceives the image, so the share of
    well-formed answers measures instruction following apart from perception."""
    from sam_mllm.data.synthetic import COLOURS, CONTEXTS, NUMBER_WORDS, PATTERNS, SHAPES

    def alt(words) -> str:
        return "(?:" + "|".join(re.escape(w) for w in words) + ")"

    name = f"a {alt(COLOURS)}(?: {alt(PATTERNS[1:])})? {alt(SHAPES)}"
    listing = f"{name}(?:, {name})*(?: and {name})?"
    ctx = alt(CONTEXTS.values())
    forms = {"colour": alt(COLOURS), "side_colour": alt(COLOURS), "shape": alt(SHAPES), "pattern": alt(PATTERNS),
             "background": alt(CONTEXTS), "count": alt(NUMBER_WORDS[1:]), "exists": "(?:yes|no)",
             "describe": f"{listing} {ctx}", "list": listing, "position": name, "refer": name, "where": ctx,
             "detail": f"there (?:is one object|are {alt(NUMBER_WORDS[2:])} objects) {ctx}\\. .+"}
    if task not in forms:
        raise ValueError(f"unknown instruction task {task!r}")
    return re.compile(forms[task] + r"\.")


def well_formed(task: str, answer: str) -> bool:
    """Whether ``answer`` (as generated: spacing around punctuation is tidied) has ``task``'s form."""
    text = re.sub(r"\s+([.,])", r"\1", " ".join(answer.lower().split()))
    return answer_form(task).fullmatch(text) is not None
