"""+VPG-C (Cheetah's "visual prompt generator complete", Table 3 row 5), attached to the LLM by a hook.

What Cheetah does (Li et al., "Empowering Vision-Language Models to Follow Interleaved Vision-Language
Instructions", and its released code): at the input of one middle LLM decoder layer, the hidden state
of the last instruction token is mapped (zero-initialised Linear, LLM width -> Q-Former width) and added
to a fresh copy of the query tokens; the frozen Q-Former reads each image again with these conditioned
queries; a second zero-initialised Linear (Q-Former width -> LLM width) maps its query outputs, which
are added to that layer's hidden states at the image's visual-token positions. It happens once per
sequence (the prompt pass; generated tokens then read the updated keys and values from the cache).
Both maps start at zero, so an untrained +VPG-C computes exactly what the model without it computes.

Choices the sources leave open for SAM's use on InstructBLIP, and what we chose:

- Layer: ``model.vpgc_layer`` (0-based; default ``None`` = the middle, ``num_layers // 2``: 16 of
  Vicuna-7B's 32, Cheetah's default ``update_layer``).
- The Q-Former re-pass also reads the instruction text, as InstructBLIP's Q-Former always does (Cheetah
  builds on BLIP-2, whose Q-Former reads no text); its queries are a trainable copy of the query tokens
  (Cheetah copies the pre-trained ones too).
- "Last instruction token": the last token before the answer in training, the last prompt token in
  generation (the same token; Cheetah's ``input_part_targets_len``), whatever ``model.image_placement``.
- What trains: the ``vpgc`` group (query copy + both maps) and, like every trained row of Table 3
  (they all build on +DATA), ``language_projection``; Cheetah keeps its projection frozen
  (``model.trainable=[vpgc]`` is that).
- Several images: each image is re-read with the same conditioned queries (as in Cheetah).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class CompleterContext:
    """What the hook needs during one LLM call; passed as the ``vpgc`` keyword of the LLM's forward so
    that it travels through gradient checkpointing and ``generate``. Rows of the LLM batch map to
    samples in blocks (``generate`` repeats each sample ``num_beams`` times in a row)."""

    qformer: nn.Module
    features: Tensor  # [B, N, P, Dv] vision features
    image_mask: Tensor  # [B, N]
    qformer_input_ids: Tensor  # [B, T]
    qformer_attention_mask: Tensor  # [B, T]
    visual_positions: Tensor  # [B, N, nq] positions of the visual tokens in the LLM sequence
    instruction_position: Tensor  # [B] position of the last instruction token


class VisualPromptCompleter(nn.Module):
    """The trainable part of +VPG-C (``query_tokens``, ``state_in``, ``state_out``) and its hook."""

    def __init__(self, query_tokens: Tensor, qformer_hidden: int, llm_hidden: int, decoder_layers: nn.ModuleList,
                 layer: int | None = None) -> None:
        super().__init__()
        n = len(decoder_layers)
        self.layer = n // 2 if layer is None else (layer + n if layer < 0 else layer)
        if not 0 <= self.layer < n:
            raise ValueError(f"model.vpgc_layer={layer} is outside the LLM's {n} layers")
        dtype, device = query_tokens.dtype, query_tokens.device
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.state_in = nn.Linear(llm_hidden, qformer_hidden, device=device, dtype=dtype)
        self.state_out = nn.Linear(qformer_hidden, llm_hidden, device=device, dtype=dtype)
        if device.type != "meta":
            for m in (self.state_in, self.state_out):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        self._generating: CompleterContext | None = None  # set by ``generating`` (see there)
        # A bound method: a deep copy of the model re-binds it to the copied completer.
        decoder_layers[self.layer].register_forward_pre_hook(self._complete, with_kwargs=True)

    def _complete(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        ctx: CompleterContext | None = kwargs.get("vpgc", self._generating)
        if ctx is None:
            raise ValueError("this LLM has a +VPG-C hook: call it through SAMModel.forward/generate, which pass "
                             "the images as the `vpgc` keyword")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and int(cache.get_seq_length(layer.self_attn.layer_idx)) > 0:
            return None  # a generation step after the prompt: the update is in the cache already
        hidden = args[0] if args else kwargs["hidden_states"]
        b = ctx.image_mask.shape[0]
        if hidden.shape[0] % b:
            raise ValueError(f"+VPG-C: {hidden.shape[0]} LLM rows do not split into the {b} samples of the batch")
        repeats = hidden.shape[0] // b
        delta = self.delta(hidden[::repeats], ctx).to(hidden.dtype)  # beams of a sample share the prompt
        hidden = hidden + delta.repeat_interleave(repeats, dim=0)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @contextlib.contextmanager
    def generating(self, ctx: CompleterContext) -> Iterator[None]:
        """The context for the LLM calls inside ``generate``, which rejects unknown keywords (there is
        no backward pass there, so the keyword route that gradient checkpointing needs is not needed)."""
        self._generating = ctx
        try:
            yield
        finally:
            self._generating = None

    def delta(self, hidden: Tensor, ctx: CompleterContext) -> Tensor:
        """[B, S, D] additions at the visual-token positions (zeros elsewhere) for hidden states [B, S, D]."""
        b = hidden.shape[0]
        nq = self.query_tokens.shape[1]
        mask = ctx.image_mask.bool()
        b_idx, n_idx = mask.nonzero(as_tuple=True)
        state = hidden[torch.arange(b, device=hidden.device), ctx.instruction_position]  # [B, D]
        state = state.to(self.state_in.weight.dtype)
        queries = self.query_tokens + self.state_in(state)[:, None, :]  # [B, nq, H]
        feats = ctx.features[b_idx, n_idx]
        text_mask = ctx.qformer_attention_mask[b_idx].long()
        out = ctx.qformer(  # the mask covers the queries and the text, as InstructBLIP builds it
            input_ids=ctx.qformer_input_ids[b_idx],
            attention_mask=torch.cat([text_mask.new_ones(len(b_idx), nq), text_mask], dim=1),
            query_embeds=queries[b_idx].to(feats.dtype), encoder_hidden_states=feats,
            encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device),
        ).last_hidden_state[:, :nq]
        update = self.state_out(out.to(self.state_out.weight.dtype))  # [M, nq, D]
        delta = hidden.new_zeros(hidden.shape, dtype=update.dtype)
        rows = b_idx[:, None].expand(-1, nq)
        return delta.index_put((rows, ctx.visual_positions[b_idx, n_idx]), update)


def visual_positions(image_mask: Tensor, attention_mask: Tensor, nq: int, image_slots: Tensor | None = None) -> Tensor:
    """[B, N, nq] positions of each image's visual tokens in the sequence ``SAMModel._assemble`` builds
    (left-padded; prefix layout, or at the markers); -1 for absent images."""
    b, n = image_mask.shape
    out = torch.full((b, n, nq), -1, dtype=torch.long, device=image_mask.device)
    q = torch.arange(nq, device=image_mask.device)
    if image_slots is None:
        # Prefix: [images' tokens, text], padding moved to the front (a stable sort keeps the order).
        lengths = image_mask.bool().sum(1) * nq + attention_mask.bool().sum(1)
        width = n * nq + attention_mask.shape[1]  # _assemble keeps every slot, padding in front
        for i in range(b):
            start = width - int(lengths[i])
            present = image_mask[i].bool().nonzero().flatten()
            for rank, k in enumerate(present.tolist()):
                out[i, k] = start + rank * nq + q
        return out
    lengths = []
    for i in range(b):
        slots = image_slots[i][attention_mask[i].bool()]
        lengths.append(len(slots) + int((slots >= 0).sum()) * (nq - 1))
    width = max(lengths)
    for i in range(b):
        slots = image_slots[i][attention_mask[i].bool()]
        cursor = width - lengths[i]
        for s in slots.tolist():
            if s >= 0:
                out[i, s] = cursor + q
                cursor += nq
            else:
                cursor += 1
    return out


def generating(model: nn.Module, batch: dict, image_embeds: Tensor, width: int) -> contextlib.AbstractContextManager:
    """``with generating(...): model.language_model.generate(...)`` (a no-op without +VPG-C)."""
    kwargs = completer_kwargs(model, batch, image_embeds, None, width)
    return model.vpgc.generating(kwargs["vpgc"]) if kwargs else contextlib.nullcontext()


def completer_kwargs(model: nn.Module, batch: dict, image_embeds: Tensor, labels: Tensor | None,
                     width: int) -> dict:
    """The ``vpgc`` keyword for the LLM call of ``model`` (empty when the model has no +VPG-C)."""
    if getattr(model, "vpgc", None) is None:
        return {}
    image_mask = batch["image_mask"].bool()
    b = image_mask.shape[0]
    if labels is not None:
        # The last token before the answer: the first answer token's position - 1 (left padding puts
        # every row's end at the same place, so each row has its answer tokens).
        instruction = (labels != -100).int().argmax(1) - 1
    else:
        instruction = torch.full((b,), width - 1, dtype=torch.long, device=image_mask.device)
    positions = visual_positions(image_mask, batch["attention_mask"], model.num_query_tokens,
                                 batch.get("image_slots"))
    return {"vpgc": CompleterContext(
        qformer=model.qformer, features=image_embeds, image_mask=image_mask,
        qformer_input_ids=batch["qformer_input_ids"], qformer_attention_mask=batch["qformer_attention_mask"],
        visual_positions=positions, instruction_position=instruction)}
