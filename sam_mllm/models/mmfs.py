"""MM-Interleaved's multi-modal feature synchronizer (MMFS), inserted into a frozen LLM by hooks.

Every LLM token (text or visual) cross-attends, through multi-scale deformable attention, to the
vision feature maps of the images it may see; the result is added between the self-attention and the
MLP of every ``every``-th decoder layer, scaled by ``tanh(gate)`` with a zero-initialised gate, so an
untrained synchronizer leaves the LLM exactly as it was. Semantics follow the released code
(github.com/OpenGVLab/MM-Interleaved, commit ac539d00), checked by tests/test_mmfs.py against its
golden outputs (tests/fixtures/official_mmfs/):

- visibility: image n is visible to token t iff its first visual token is at or before t (within
  the same ``<s>`` document when document starts are given); padded image slots never are;
- per image, ``q_n = W_q f + PosEmbed[r_n]`` with r_n = 1 for the newest visible image, 2 for the
  one before, ... (W_q applied once per token); one offset per (image, head, point) shared by all
  levels: location = reference (0.5, 0.5) + offset / base_spatial_shape on every level;
- one softmax per (token, head) jointly over images x levels x points plus an "attend to nothing"
  slot of logit 0 (the official N·L slots of logit -log(N·L) add exactly 1 to the denominator);
  that slot's mass multiplies the learnable ``ignore_token`` value (per head) before ``output_proj``.

Parameter names are the official ones below ``llama_cross_attn.`` (``attn.dynamic_offset_mask``,
``attn.query_relpos``, ``attn.sampling_offsets``, ``attn.attention_weights``, ``attn.value_proj``,
``attn.output_proj``, ``attn.ignore_token``, ``norm1``, ``norm2``, ``gate``); in an MMInterleaved
checkpoint ``mm_decoder.layers.{i}.llama_cross_attn.X`` is our ``synchronizer.{i}.X``
(:func:`official_state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # a model-internal op class of transformers, not a documented API: guard it
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
except ImportError as err:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "the MMFS variants need transformers' MultiScaleDeformableAttention op class "
        "(transformers.models.deformable_detr.modeling_deformable_detr, transformers 5.x; written "
        "against 5.24): pip install -U 'transformers>=5'"
    ) from err
from transformers.models.llama.modeling_llama import LlamaRMSNorm

LEVELS = ("single", "pyramid")


class MMFS(nn.Module):
    """The synchronizer's attention (official ``MMFS``), on transformers' deformable-attention op."""

    def __init__(
        self, d_model: int, d_value: int, *, heads: int = 16, points: int = 8, levels: int = 1,
        base_spatial_shape: int = 16, max_images: int = 50, offset_init: float = 3.0,
    ) -> None:
        super().__init__()
        if d_value % heads:
            raise ValueError(f"MMFS: the vision width {d_value} is not divisible by heads={heads}")
        self.heads, self.points, self.levels = heads, points, levels
        self.base_spatial_shape = base_spatial_shape
        self.offset_init = offset_init
        self.dynamic_offset_mask = nn.Linear(d_model, d_model)  # W_q
        self.query_relpos = nn.Embedding(max_images, d_model)  # PosEmbed, row 0 = invisible
        self.sampling_offsets = nn.Linear(d_model, heads * points * 2)  # W_p
        # W_A: the (P+1)-th row per (head, level) exists in the official layout but is never used.
        self.attention_weights = nn.Linear(d_model, heads * levels * (points + 1))
        self.value_proj = nn.Linear(d_value, d_value)
        self.output_proj = nn.Linear(d_value, d_model)
        # Value of "attend to nothing"; zero at init, trained (MMInterleaved trains it).
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, d_value))
        self.op = MultiScaleDeformableAttention()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released initialisation (official mmfs.py and MMInterleaved._init_mmfs_weights)."""
        if self.value_proj.weight.device.type == "meta":
            return
        nn.init.normal_(self.dynamic_offset_mask.weight, std=0.02)
        nn.init.zeros_(self.dynamic_offset_mask.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)
        nn.init.zeros_(self.sampling_offsets.weight)  # query-independent offsets at the start
        nn.init.uniform_(self.sampling_offsets.bias, -self.offset_init, self.offset_init)
        nn.init.normal_(self.attention_weights.weight, std=0.02)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.ignore_token)

    def forward(
        self, query: Tensor, features: Tensor, visibility: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """query [B, T, D]; features [B, N, ΣHW, Dv] (levels concatenated, row-major);
        visibility [B, T, N] (bool or 0/1). Returns [B, T, D]."""
        return self.attend(query, self.value_proj(features), visibility, spatial_shapes)

    def attend(
        self, query: Tensor, values: Tensor, visibility: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """As :meth:`forward` with ``values = value_proj(features)`` already computed."""
        b, t, _ = query.shape
        n, hw, dv = values.shape[1:]
        h, p, lv = self.heads, self.points, self.levels
        if len(spatial_shapes) != lv or sum(a * c for a, c in spatial_shapes) != hw:
            raise ValueError(f"MMFS: {lv} level(s) of shapes {spatial_shapes} do not cover {hw} feature positions")
        if n >= self.query_relpos.num_embeddings:
            raise ValueError(f"MMFS: {n} image slots, but only {self.query_relpos.num_embeddings - 1} image positions")
        vis = visibility.bool()
        relpos = (vis.sum(-1, keepdim=True) + 1 - vis.long().cumsum(-1)) * vis  # newest visible = 1
        q = self.dynamic_offset_mask(query)[:, :, None] + self.query_relpos(relpos)  # [B, T, N, D]
        offsets = self.sampling_offsets(q).view(b, t, n, h, 1, p, 2)
        # The same normalised point on every level (offsets scaled by s_l / base, then divided by s_l).
        locations = (0.5 + offsets.float() / self.base_spatial_shape).expand(-1, -1, -1, -1, lv, -1, -1)
        logits = self.attention_weights(q).float().view(b, t, n, h, lv, p + 1)[..., :p]
        logits = logits.masked_fill(~vis[..., None, None, None], float("-inf"))
        # One softmax per (token, head) over images x levels x points and a null slot of logit 0.
        logits = logits.permute(0, 1, 3, 2, 4, 5).reshape(b, t, h, n * lv * p)
        weights = torch.softmax(torch.cat([logits, logits.new_zeros(b, t, h, 1)], dim=-1), dim=-1)
        weights, null = weights[..., :-1], weights[..., -1]
        weights = weights.view(b, t, h, n, lv, p).permute(0, 3, 1, 2, 4, 5)  # [B, N, T, H, L, P]
        # Images folded into the batch: one op call samples every image; their outputs are summed.
        dh = dv // h
        starts = [0]
        for a, c in spatial_shapes[:-1]:
            starts.append(starts[-1] + a * c)
        shapes = torch.tensor(spatial_shapes, dtype=torch.long, device=values.device)
        # Sampling in float32 whatever the autocast dtype: bf16 locations would move points by ~1/256.
        sampled = self.op(
            values.float().reshape(b * n, hw, h, dh), shapes, list(spatial_shapes),
            torch.tensor(starts, dtype=torch.long, device=values.device),
            locations.permute(0, 2, 1, 3, 4, 5, 6).reshape(b * n, t, h, lv, p, 2).float(),
            weights.reshape(b * n, t, h, lv, p).float(), 64,
        ).view(b, n, t, dv).sum(1)
        nothing = null[..., None].float() * self.ignore_token.float().view(h, dh)  # [B, T, H, dh]
        return self.output_proj((sampled + nothing.reshape(b, t, dv)).to(self.output_proj.weight.dtype))


class SynchronizerBlock(nn.Module):
    """The gated sub-block of one decoder layer (official ``llama_cross_attn``):
    ``h + tanh(gate) * MMFS(norm1(h), norm2(v))`` with RMSNorms of the LLM's eps."""

    def __init__(self, d_model: int, d_value: int, *, eps: float = 1e-6, **mmfs_options) -> None:
        super().__init__()
        self.norm1 = LlamaRMSNorm(d_model, eps=eps)
        self.norm2 = LlamaRMSNorm(d_value, eps=eps)
        self.attn = MMFS(d_model, d_value, **mmfs_options)
        self.gate = nn.Parameter(torch.zeros(1))

    def values(self, features: Tensor) -> Tensor:
        """value_proj(norm2(features)), reusable for every query of one image set."""
        return self.attn.value_proj(self.norm2(features.to(self.gate.dtype)))

    def delta(self, hidden: Tensor, values: Tensor, visibility: Tensor, spatial_shapes: list) -> Tensor:
        """``tanh(gate) * MMFS(norm1(hidden))``, to be added to ``hidden`` (the un-normalised residual)."""
        out = self.attn.attend(self.norm1(hidden.to(self.gate.dtype)), values, visibility, spatial_shapes)
        return (self.gate.tanh() * out).to(hidden.dtype)

    def forward(self, hidden: Tensor, features: Tensor, visibility: Tensor, spatial_shapes: list) -> Tensor:
        return hidden + self.delta(hidden, self.values(features), visibility, spatial_shapes)


# ------------------------------------------------------------------------------ layout helpers


def visibility_mask(image_starts: Tensor, seq_len: int, document_starts: Tensor | None = None) -> Tensor:
    """[B, T, N] bool: token t sees image n iff its first visual token ``image_starts[b, n]`` is at or
    before t and after the last document start at or before t; ``image_starts < 0`` = padded slot."""
    t = torch.arange(seq_len, device=image_starts.device)
    starts = image_starts[:, None, :]  # [B, 1, N]
    vis = (starts >= 0) & (starts <= t[None, :, None])
    if document_starts is not None:
        marked = torch.where(document_starts.bool(), t[None], torch.full_like(t[None], -1))
        nearest = marked.cummax(dim=1).values  # last document start at or before t (-1 if none)
        vis &= starts > nearest[:, :, None]
    return vis


def pack_features(levels: list[Tensor], num_images: list[int]) -> Tensor:
    """Official packing: maps [ΣN, Dv, h_l, w_l] of every image in order -> [B, N_max, Σ h·w, Dv],
    each map flattened row-major, levels concatenated, absent images zeros."""
    flat = torch.cat([lv.flatten(2).transpose(1, 2) for lv in levels], dim=1)  # [ΣN, ΣHW, Dv]
    if flat.shape[0] != sum(num_images):
        raise ValueError(f"pack_features: {flat.shape[0]} feature maps for {sum(num_images)} images")
    out = flat.new_zeros(len(num_images), max(num_images), *flat.shape[1:])
    for i, chunk in enumerate(flat.split(list(num_images))):
        out[i, : len(chunk)] = chunk
    return out


def vit_feature_maps(image_embeds: Tensor, levels: str = "single") -> tuple[Tensor, list[tuple[int, int]]]:
    """Synchronizer features from the vision features ``perceive`` reads.

    image_embeds [B, N, 1 + g², Dv] (CLS first, patches row-major) -> [B, N, ΣHW, Dv] and the level
    shapes. ``single``: the g x g patch grid. ``pyramid``: a parameter-free stand-in for the official
    trainable ViT-Adapter maps 32/16/8 around a 16 grid: 2x bilinear up-sampling, the grid, 2x
    average pooling, in that (official) order.
    """
    if levels not in LEVELS:
        raise ValueError(f"model.mmfs.levels={levels!r} is not one of {', '.join(LEVELS)}")
    b, n, pnum, dv = image_embeds.shape
    g = math.isqrt(pnum - 1)
    if g * g != pnum - 1:
        raise ValueError(f"MMFS: {pnum} vision positions are not a CLS token plus a square patch grid")
    grid = image_embeds[:, :, 1:]
    if levels == "single":
        return grid, [(g, g)]
    if g % 2:
        raise ValueError(f"model.mmfs.levels=pyramid needs an even patch grid, got {g}x{g}")
    maps = grid.reshape(b * n, g, g, dv).permute(0, 3, 1, 2)
    pyramid = [F.interpolate(maps, scale_factor=2, mode="bilinear", align_corners=False), maps, F.avg_pool2d(maps, 2)]
    flat = torch.cat([m.flatten(2).transpose(1, 2) for m in pyramid], dim=1)
    return flat.reshape(b, n, -1, dv), [(2 * g, 2 * g), (g, g), (g // 2, g // 2)]


# ------------------------------------------------------------------------------ insertion


@dataclass
class SynchronizerContext:
    """What the hooks need during one LLM call (passed as the ``mmfs`` keyword of the LLM's forward,
    so it travels with gradient checkpointing and through ``generate``).

    features [B, N, ΣHW, Dv]; visibility [B, S, N] for the S positions of the assembled prompt;
    image_mask [B, N]. Positions >= S (generated tokens) see every present image. Rows of the LLM
    batch map to samples in blocks (``generate`` repeats each sample ``num_beams`` times in a row).
    """

    features: Tensor
    visibility: Tensor
    image_mask: Tensor
    spatial_shapes: list[tuple[int, int]]
    values: dict[int, Tensor] = field(default_factory=dict)  # per-layer value cache, no-grad only

    def rows_visibility(self, rows: int, start: int, length: int) -> Tensor:
        """[B, repeats * length, N]: each sample's ``repeats`` rows laid side by side as tokens."""
        b, s, _ = self.visibility.shape
        if rows % b:
            raise ValueError(f"MMFS: {rows} LLM rows do not split into the {b} samples of the batch")
        pos = torch.arange(start, start + length, device=self.visibility.device)
        vis = self.visibility[:, pos.clamp(max=s - 1)]
        vis = torch.where((pos >= s)[None, :, None], self.image_mask[:, None, :].bool(), vis)
        return vis.repeat(1, rows // b, 1)


class FeatureSynchronizer(nn.Module):
    """One :class:`SynchronizerBlock` per chosen decoder layer (``blocks[str(i)]``), attached to the
    LLM by two hooks per layer: a pre-hook on its ``input_layernorm`` keeps the layer's input (the
    residual) and a forward hook on its ``self_attn`` adds the gated block's output to the attention
    output, so the layer's own residual add yields ``h + tanh(gate) * MMFS(norm1(h))`` with
    ``h = x + attn``. Both are inner modules, so gradient checkpointing (which replays the layer's
    ``forward``, not its hooks) replays them too."""

    def __init__(self, decoder_layers: nn.ModuleList, d_value: int, *, every: int = 4, eps: float = 1e-6,
                 **mmfs_options) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"model.mmfs.every={every} must be >= 1")
        d_model = decoder_layers[0].self_attn.o_proj.out_features
        self.layer_ids = list(range(0, len(decoder_layers), every))
        self.blocks = nn.ModuleDict(
            {str(i): SynchronizerBlock(d_model, d_value, eps=eps, **mmfs_options) for i in self.layer_ids}
        )
        self._residual: Tensor | None = None
        for i in self.layer_ids:
            # Bound methods: a deep copy of the model re-binds them to the copied synchronizer.
            decoder_layers[i].input_layernorm.register_forward_pre_hook(self._keep_input)
            decoder_layers[i].self_attn.register_forward_hook(self._add_block, with_kwargs=True)

    def _keep_input(self, norm: nn.Module, args: tuple) -> None:
        self._residual = args[0]  # input_layernorm runs right before self_attn in the same layer

    def _add_block(self, attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        ctx = kwargs.get("mmfs")
        if ctx is None:
            raise ValueError(
                "this LLM has MMFS layers: call it through SAMModel.forward/generate, which pass the "
                "images' features as the `mmfs` keyword"
            )
        residual, self._residual = self._residual, None
        idx = attn.layer_idx
        block = self.blocks[str(idx)]
        out = output[0]
        rows, length, d = out.shape
        # The cache already holds this call's tokens when the attention returns.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length(idx)) - length if cache is not None else 0
        b = ctx.visibility.shape[0]
        if torch.is_grad_enabled():
            values = block.values(ctx.features)
        else:  # generation: project each image set once per layer, not at every step
            values = ctx.values.get(idx)
            if values is None:
                values = ctx.values[idx] = block.values(ctx.features)
        vis = ctx.rows_visibility(rows, past, length)
        # Per-token attention: a sample's rows (beams) become extra tokens of that sample.
        h = (residual + out).reshape(b, (rows // b) * length, d)
        delta = block.delta(h, values, vis, ctx.spatial_shapes).reshape(rows, length, d)
        return (out + delta, *output[1:])


def official_state_dict(state_dict: dict[str, Tensor], prefix: str = "mm_decoder.layers.") -> dict[str, Tensor]:
    """An MMInterleaved checkpoint's LLM-side MMFS weights under our names:
    ``{prefix}{i}.llama_cross_attn.X`` -> ``blocks.{i}.X`` (load into ``SAMModel.synchronizer``)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and ".llama_cross_attn." in key:
            layer, rest = key[len(prefix):].split(".llama_cross_attn.", 1)
            out[f"blocks.{layer}.{rest}"] = value
    return out
