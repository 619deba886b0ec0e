"""Where the visual tokens go in the LLM input: ``model.image_placement``.

``prefix`` (the released code's layout, the default): every image's visual tokens, in order, before
the prompt; ``{image#k}`` markers in the prompt stay literal text.

``markers``: image k's visual tokens replace its marker in the prompt, as interleaved multi-image
models do. A prompt uses either DEMON-style ``{image#k}`` markers (1-based, any order, each image
exactly once) or ``<image>`` markers (one per image, in image order), never both. The text between
markers is tokenised piece by piece, so a marker is a word boundary; the tokenizer's BOS stays
first; the Q-Former reads the prompt with the markers removed. When the prompt is over
``max_prompt_tokens``, text is dropped from the left as in ``prefix`` mode, never a marker. A sample
whose markers do not match its images is a :class:`MarkerError` naming the sample.

The collator marks each image's place with one placeholder token and ``image_slots`` (-1 for text,
k for image k); the model expands each placeholder to the image's visual tokens.
"""

from __future__ import annotations

import re

from sam_mllm.data.schema import DataError

PLACEMENTS = ("prefix", "markers")
MARKER = re.compile(r"\{image#(\d+)\}|<image>")


class MarkerError(DataError):
    """A prompt whose image markers do not match the sample's images."""


def split_at_markers(instruction: str, num_images: int, sample_id: object) -> tuple[list[str], list[int]]:
    """(text pieces, 0-based image index of each marker); ``len(pieces) == len(images) + 1``."""
    pieces, order, numbered, plain, pos = [], [], 0, 0, 0
    for m in MARKER.finditer(instruction):
        pieces.append(instruction[pos : m.start()])
        if m.group(1) is not None:
            numbered += 1
            order.append(int(m.group(1)) - 1)
        else:
            plain += 1
            order.append(plain - 1)
        pos = m.end()
    pieces.append(instruction[pos:])
    where = f"sample id {sample_id!r}: model.image_placement=markers"
    if numbered and plain:
        raise MarkerError(f"{where}: the prompt mixes {{image#k}} and <image> markers; use one kind")
    if sorted(order) != list(range(num_images)):
        found = [m.group(0) for m in MARKER.finditer(instruction)]
        raise MarkerError(
            f"{where} needs one marker per image: {num_images} image(s), but the prompt has "
            f"{len(found)} marker(s) {found}" + (f" (expected {{image#1}}..{{image#{num_images}}}, each once)"
                                                 if numbered else "")
            + ". Add {image#k} or <image> markers, or use model.image_placement=prefix")
    return pieces, order


def strip_markers(instruction: str) -> str:
    """The prompt without its markers (what the Q-Former reads in ``markers`` mode)."""
    return re.sub(r"[ \t]{2,}", " ", MARKER.sub(" ", instruction)).strip()


def tokenize_at_markers(tokenizer, instruction: str, num_images: int, sample_id: object,
                        max_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, image slots): one placeholder id per image where its marker was, slot = image index."""
    pieces, order = split_at_markers(instruction, num_images, sample_id)
    head = list(tokenizer("").input_ids)  # the tokenizer's leading special tokens (BOS)
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, slots = list(head), [-1] * len(head)
    for k, piece in enumerate(pieces):
        if piece:
            text = tokenizer(piece, add_special_tokens=False).input_ids
            ids += text
            slots += [-1] * len(text)
        if k < len(order):
            ids.append(placeholder)
            slots.append(order[k])
    excess = len(ids) - max_tokens
    if excess > 0:
        # Drop text from the left (the question is at the end), keeping the head and every placeholder.
        drop = set()
        for i in range(len(head), len(ids)):
            if len(drop) == excess:
                break
            if slots[i] < 0:
                drop.add(i)
        ids = [t for i, t in enumerate(ids) if i not in drop]
        slots = [s for i, s in enumerate(slots) if i not in drop]
    return ids, slots
