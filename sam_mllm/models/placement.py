"""LLM input with each image's visual tokens at its marker (``model.image_placement=markers``).

The collator (``sam_mllm.data.placement``) leaves one placeholder token per image and ``image_slots``
(-1 for text, k for image k); here each placeholder becomes image k's ``num_query`` visual tokens.
Rows are left-padded with explicit position ids, as in the prefix layout, so a sample in a batch
computes exactly what it computes alone whatever its markers' positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def assemble_at_markers(
    visual_tokens: Tensor, image_mask: Tensor, text_embeds: Tensor, attention_mask: Tensor,
    image_slots: Tensor, labels: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(embeds, attention mask, position ids, labels), left-padded; visual positions get label -100.

    Args:
        visual_tokens: [B, N, nq, D] per-image visual tokens (zeros in padded image slots).
        image_mask: [B, N] True where an image is present.
        text_embeds: [B, T, D] embeddings of ``input_ids`` (placeholders included; they are replaced).
        attention_mask: [B, T] 1 for real tokens (right padding).
        image_slots: [B, T] image index at each placeholder, -1 elsewhere.
    """
    b, _, nq, _ = visual_tokens.shape
    rows, label_rows = [], []
    for i in range(b):
        keep = attention_mask[i].bool()
        slots = image_slots[i][keep]
        is_img = slots >= 0
        used = slots[is_img]
        present = image_mask[i].bool()
        if used.numel() != int(present.sum()) or not bool(present[used].all()) or used.unique().numel() != used.numel():
            raise ValueError(f"batch row {i}: its image placeholders {used.tolist()} do not name each of its "
                             f"{int(present.sum())} images once")
        repeats = torch.where(is_img, nq, 1)
        source = torch.repeat_interleave(torch.arange(len(slots), device=slots.device), repeats)
        starts = torch.cumsum(repeats, 0) - repeats
        offset = torch.arange(len(source), device=slots.device) - starts[source]
        out = text_embeds[i][keep][source]
        img_pos = is_img[source]
        out[img_pos] = visual_tokens[i, slots[source][img_pos], offset[img_pos]].to(out.dtype)
        rows.append(out)
        if labels is not None:
            lab = labels[i][keep][source]
            label_rows.append(lab.masked_fill(img_pos, -100))
    width = max(len(r) for r in rows)
    d = text_embeds.shape[-1]
    embeds = text_embeds.new_zeros(b, width, d)
    mask = torch.zeros(b, width, dtype=torch.long, device=text_embeds.device)
    positions = torch.zeros(b, width, dtype=torch.long, device=text_embeds.device)
    new_labels = None if labels is None else labels.new_full((b, width), -100)
    for i, r in enumerate(rows):
        n = len(r)
        embeds[i, width - n :] = r
        mask[i, width - n :] = 1
        positions[i, width - n :] = torch.arange(n, device=text_embeds.device)
        if new_labels is not None:
            new_labels[i, width - n :] = label_rows[i]
    return embeds, mask, positions, new_labels
