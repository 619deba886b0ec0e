"""SAM composed on transformers' InstructBLIP modules (docs/DESIGN.md §1).

The Q-Former's own layers are called in a short loop below for two streams: the Q-stream reads
the current image, the W-stream (the "W-former") reads the merged context of the sample's
images, and the two exchange information through zero-initialised ``w_in`` / ``w_out`` at the
interaction layers l <= k. Variants (no guidance, mean context, +LIN) are options of this one class.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    InstructBlipForConditionalGeneration,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from sam_mllm.config import ConfigError
from sam_mllm.models.vpgc import VisualPromptCompleter, completer_kwargs
from sam_mllm.models.vpgc import generating as vpgc_generating

GUIDANCE = ("none", "w_former", "linear")
PATCH_WEIGHTING = ("adaptive", "mean")
CONTEXT = ("all", "others")
# qformer: InstructBLIP's Q-Former (num_query tokens per image); mlp: a LLaVA-1.5-style GELU MLP on
# every ViT patch (one token per patch; the setting in which SEA was published).
PERCEIVER = ("qformer", "mlp")
# Generation settings of the released code (docs/DESIGN.md §1). Its generate(max_length=256,
# min_length=1) from embeddings started, under its transformers 4.33, from one dummy BOS that both
# limits counted: at most 255 new tokens, and no minimum (an empty answer is possible). See
# docs/REPRODUCING.md.
RELEASED_GENERATION = dict(
    num_beams=5, max_new_tokens=255, min_new_tokens=0, repetition_penalty=1.5, length_penalty=1.0,
    do_sample=False,
)


@dataclass
class Perception:
    """Per-image outputs of the perception stage; padded image slots hold zeros."""

    query_output: Tensor  # [B, N, num_query, H] Q-Former query outputs
    visual_tokens: Tensor  # [B, N, num_query, D_llm] language_projection of the above
    last_hidden_state: Tensor | None = None  # [B, N, num_query + T, H] when asked for
    image_embeds: Tensor | None = None  # [B, N, P, Dv] the vision features perceived (training objectives read them)


@dataclass
class SAMOutput:
    loss: Tensor
    logits: Tensor
    num_target_tokens: int
    perception: Perception | None = None  # for auxiliary training objectives (SEA)


class SAMModel(nn.Module):
    """InstructBLIP with SAM's bidirectional semantic guidance; ``guidance='none'`` is InstructBLIP."""

    def __init__(
        self,
        backbone: InstructBlipForConditionalGeneration,
        qformer_tokenizer: PreTrainedTokenizerBase | None = None,
        llm_tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        guidance: str = "w_former",
        patch_weighting: str = "adaptive",
        context: str = "all",
        guide_in_layer: int = -1,
        guide_out_layer: int = -1,
        trainable: list[str] | None = None,
        max_images: int = 8,
        gradient_checkpointing: bool = False,
        perceiver: str = "qformer",
        vpgc: bool = False,
        vpgc_layer: int | None = None,
        mmfs: dict | None = None,
    ) -> None:
        super().__init__()
        _check_choice("guidance", guidance, GUIDANCE)
        _check_choice("perceiver", perceiver, PERCEIVER)
        if perceiver == "mlp" and guidance != "none":
            raise ValueError(f"perceiver='mlp' has no Q-Former stream to guide; guidance must be 'none', not {guidance!r}")
        self.perceiver = perceiver
        _check_choice("patch_weighting", patch_weighting, PATCH_WEIGHTING)
        _check_choice("context", context, CONTEXT)
        self.config = backbone.config
        # The backbone's parts are adopted as direct children so that parameter names are the
        # Hugging Face InstructBLIP names (what the LAVIS converter produces).
        self.vision_model = backbone.vision_model
        self.query_tokens = backbone.query_tokens
        self.qformer = backbone.qformer
        self.language_projection = backbone.language_projection
        self.language_model = backbone.language_model
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.guidance = guidance
        self.patch_weighting = patch_weighting
        self.context = context
        self.max_images = max_images

        num_layers = self.config.qformer_config.num_hidden_layers
        self.guide_in_layer = _layer_index(guide_in_layer, num_layers, "guide_in_layer")
        self.guide_out_layer = _layer_index(guide_out_layer, num_layers, "guide_out_layer")
        if guidance == "w_former" and self.guide_in_layer > self.guide_out_layer:
            raise ConfigError(
                f"guide_in_layer (l={self.guide_in_layer}) must not come after guide_out_layer "
                f"(k={self.guide_out_layer}): the W-stream must exist before it can guide"
            )

        dq = self.config.qformer_config.hidden_size
        dv = self.config.vision_config.hidden_size
        dtype = self.language_projection.weight.dtype
        device = self.language_projection.weight.device
        if guidance != "none" and patch_weighting == "adaptive":
            self.patch_weight = nn.Linear(dv, 1, device=device, dtype=dtype)
        if guidance == "w_former":
            self.w_in = nn.Linear(dq, dq, device=device, dtype=dtype)
            self.w_out = nn.Linear(dq, dq, device=device, dtype=dtype)
            _zero_(self.w_in, self.w_out)
        elif guidance == "linear":
            # +LIN: one Linear maps the patch-mean of the merged context into the Q-stream at layer k.
            self.context_proj = nn.Linear(dv, dq, device=device, dtype=dtype)
            _zero_(self.context_proj)
        if perceiver == "mlp":
            dl = self.config.text_config.hidden_size
            self.mlp_projector = nn.Sequential(nn.Linear(dv, dl, device=device, dtype=dtype), nn.GELU(),
                                               nn.Linear(dl, dl, device=device, dtype=dtype))
        if vpgc:
            # +VPG-C: a hook at a middle LLM layer re-reads the images (sam_mllm.models.vpgc).
            self.vpgc = VisualPromptCompleter(self.query_tokens, dq, self.config.text_config.hidden_size,
                                              self.language_model.model.layers, vpgc_layer)
        if guidance != "none" and patch_weighting == "adaptive" and device.type != "meta":
            nn.init.normal_(self.patch_weight.weight, std=0.02)
            nn.init.zeros_(self.patch_weight.bias)

        if mmfs is not None:
            # MM-Interleaved's feature synchronizer in every ``every``-th LLM layer (models/mmfs.py).
            from sam_mllm.models.mmfs import FeatureSynchronizer

            opts = dict(mmfs)
            self.mmfs_levels = opts.pop("levels", "single")
            with torch.device(device):
                self.mmfs = FeatureSynchronizer(
                    self.language_model.get_decoder().layers, dv, eps=self.config.text_config.rms_norm_eps,
                    levels=3 if self.mmfs_levels == "pyramid" else 1, base_spatial_shape=self._vision_grid(), **opts,
                ).to(dtype)

        self.gradient_checkpointing = False
        self.precision = "default"  # or "paper": see use_paper_precision
        self.trainable = list(trainable) if trainable is not None else self.default_trainable()
        self.set_trainable(self.trainable)
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ parameters and modes

    def parameter_groups(self) -> dict[str, nn.Module | nn.Parameter]:
        """Named groups that ``trainable`` may list."""
        groups: dict[str, nn.Module | nn.Parameter] = {}
        for name in ("patch_weight", "w_in", "w_out", "context_proj", "mlp_projector", "vpgc", "mmfs"):
            if hasattr(self, name):
                groups[name] = getattr(self, name)
        groups.update(
            language_projection=self.language_projection, query_tokens=self.query_tokens,
            qformer=self.qformer, vision_model=self.vision_model, language_model=self.language_model,
        )
        return groups

    def default_trainable(self) -> list[str]:
        if self.perceiver == "mlp":
            return ["mlp_projector"]  # the Q-Former and its projection are not used
        return [g for g in ("patch_weight", "w_in", "w_out", "context_proj", "vpgc", "mmfs", "language_projection")
                if g in self.parameter_groups()]

    def set_trainable(self, names: list[str]) -> None:
        """Train the listed groups and parameter-name patterns (``sam_mllm.models.trainable``)."""
        from sam_mllm.models.trainable import resolve_trainable

        selected, covered, self._pattern_modules = resolve_trainable(
            self, list(names), self.parameter_groups(), where=f"for guidance={self.guidance!r}")
        self.trainable = list(names)
        for name, p in self.named_parameters():
            if name in covered:
                p.requires_grad_(name in selected)
        self.train(self.training)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> SAMModel:
        """Frozen modules stay in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        groups = self.parameter_groups()
        for name, group in groups.items():
            if isinstance(group, nn.Module) and name not in self.trainable:
                group.eval()
        for name in getattr(self, "_pattern_modules", ()):
            # A module a trainable pattern names follows ``mode`` even inside a frozen group.
            self.get_submodule(name).train(mode)
        if self.gradient_checkpointing:
            # transformers checkpoints a layer only when the layer itself is in training mode; flip
            # that flag on the layer objects alone so their dropout children stay off.
            for module in self.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = mode
        return self

    def enable_gradient_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        for part in (self.qformer, self.language_model):
            # transformers 5 renamed the switch; older releases only have the second name.
            if hasattr(part, "activation_checkpointing_enable"):
                part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.gradient_checkpointing = True
        self.train(self.training)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.language_projection.weight.device

    # ------------------------------------------------------------------ perception

    def encode_images(self, pixel_values: Tensor, image_mask: Tensor) -> Tensor:
        """Vision features [B, N, P, Dv] after the final LayerNorm; every present image in one call."""
        b, n = image_mask.shape
        flat = pixel_values[image_mask]  # [M, 3, H, W]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(grad), self._autocast("vision"):
            feats = self.vision_model(pixel_values=flat).last_hidden_state
        if self.precision == "paper":
            feats = feats.float()  # the released ln_vision ran under autocast, whose layer_norm gives fp32
        return _scatter_images(feats, image_mask, b, n)

    def merge_context(self, image_embeds: Tensor, image_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Merged context features and the per-patch weights over context images.

        ``context='all'``: Ĩ [B, P, Dv], the same for every image of a sample.
        ``context='others'``: Ĩ_i [B, N, P, Dv], leaving image i out; computed in O(N) (leave-one-out
        sums, with the top-scoring image of each patch handled by its own pass so that no
        cancellation or underflow can occur). Images without any context get zeros.
        """
        x = image_embeds
        if self.patch_weighting == "adaptive":
            logits = self.patch_weight(x).squeeze(-1)  # [B, N, P]
        else:
            logits = torch.zeros(x.shape[:3], dtype=x.dtype, device=x.device)
        logits = logits.float().masked_fill(~image_mask[:, :, None], float("-inf"))
        if self.context == "all":
            weights = torch.softmax(logits, dim=1)
            return torch.einsum("bnp,bnpd->bpd", weights.to(x.dtype), x), weights
        # Leave-one-out softmax. Shift by the max over images: every image except the argmax then has
        # the argmax term (weight 1) left in its denominator after subtracting its own term.
        top2, top2_idx = logits.topk(min(2, logits.shape[1]), dim=1)
        shifted = torch.exp(logits - top2[:, :1]).nan_to_num(0.0)  # [B, N, P]; absent images 0
        num_all = torch.einsum("bnp,bnpd->bpd", shifted.to(x.dtype), x)
        den_all = shifted.sum(1)
        num = num_all[:, None] - shifted[..., None].to(x.dtype) * x
        den = den_all[:, None] - shifted
        # For the argmax image, re-shift by the second-best logit (its true leave-one-out max).
        is_top = F.one_hot(top2_idx[:, 0], logits.shape[1]).permute(0, 2, 1).bool()  # [B, N, P]
        if logits.shape[1] > 1:
            second = top2[:, 1:2]
            shifted2 = torch.exp(logits - second).nan_to_num(0.0).masked_fill(is_top, 0.0)
            shifted2 = torch.where(torch.isfinite(second), shifted2, torch.zeros_like(shifted2))
            num_top = torch.einsum("bnp,bnpd->bpd", shifted2.to(x.dtype), x)
            den_top = shifted2.sum(1)
            num = torch.where(is_top[..., None], num_top[:, None], num)
            den = torch.where(is_top, den_top[:, None], den)
        has = den > 0
        merged = num / torch.where(has, den, torch.ones_like(den))[..., None].to(x.dtype)
        return merged.masked_fill(~has[..., None], 0.0), None

    def perceive(
        self,
        image_embeds: Tensor,
        image_mask: Tensor,
        qformer_input_ids: Tensor,
        qformer_attention_mask: Tensor,
        output_hidden_states: bool = False,
    ) -> Perception:
        """Visual tokens from precomputed vision features — the stable seam of the model.

        Args:
            image_embeds: [B, N, P, Dv] vision features after the vision model's final LayerNorm.
            image_mask: [B, N] bool, True where an image is present (padded slots are ignored).
            qformer_input_ids, qformer_attention_mask: [B, T] the prompt's Q-Former tokens.
        Returns a :class:`Perception` with per-image query outputs and LLM-ready visual tokens.
        All images of the batch go through the Q-Former as one batch of M = image_mask.sum() rows.
        """
        b, n = image_mask.shape
        image_mask = image_mask.bool()
        if image_mask.sum(1).min() < 1:
            raise ValueError("every sample needs at least one image (a row of image_mask is all False)")
        if self.perceiver == "mlp":  # one token per patch (CLS dropped, as LLaVA); no instruction input
            patches = image_embeds[:, :, 1:][image_mask]
            return Perception(query_output=_scatter_images(patches, image_mask, b, n),
                              visual_tokens=_scatter_images(self.mlp_projector(patches), image_mask, b, n))
        b_idx, n_idx = image_mask.nonzero(as_tuple=True)
        nq = self.num_query_tokens
        feats = image_embeds[b_idx, n_idx]  # [M, P, Dv]
        text_mask = qformer_attention_mask.to(torch.long)
        embeds = self.qformer.embeddings(
            input_ids=qformer_input_ids, query_embeds=self.query_tokens.expand(b, -1, -1)
        )  # [B, S, H]
        mask_2d = torch.cat([text_mask.new_ones(b, nq), text_mask], dim=1)

        q, q_mask = embeds[b_idx], self._attention_mask(embeds[b_idx], mask_2d[b_idx])
        guided = self.guidance != "none"
        if guided:
            merged, _ = self.merge_context(image_embeds, image_mask)
            if self.context == "all":
                has_context = torch.ones(len(b_idx), dtype=torch.bool, device=q.device)
            else:
                merged = merged[b_idx, n_idx]  # [M, P, Dv]: one context per image
                has_context = image_mask.sum(1)[b_idx] > 1

        layers = self.qformer.encoder.layer
        l_in, k_out = self.guide_in_layer, self.guide_out_layer
        w = None
        for i, layer in enumerate(layers):
            if self.guidance == "w_former" and i == l_in:
                w, w_ctx = self._w_stream_below(embeds, mask_2d, merged, b_idx, l_in)
                w = w + self.w_in(q)
            if self.guidance == "w_former" and l_in <= i <= k_out:
                w = layer(w, q_mask, w_ctx, query_length=nq)
                if i == k_out:
                    q = torch.where(has_context[:, None, None], q + self.w_out(w), q)
                    w = None  # the W-stream ends at k; its output is not used further
            if self.guidance == "linear" and i == k_out:
                pooled = merged.mean(dim=-2)  # [B or M, Dv]
                pooled = pooled[b_idx] if self.context == "all" else pooled
                q = torch.where(has_context[:, None, None], q + self.context_proj(pooled)[:, None, :], q)
            q = layer(q, q_mask, feats, query_length=nq)

        query_output = q[:, :nq]
        tokens = self.language_projection(query_output)
        return Perception(
            query_output=_scatter_images(query_output, image_mask, b, n),
            visual_tokens=_scatter_images(tokens, image_mask, b, n),
            last_hidden_state=_scatter_images(q, image_mask, b, n) if output_hidden_states else None,
        )

    def _w_stream_below(
        self, embeds: Tensor, mask_2d: Tensor, merged: Tensor, b_idx: Tensor, upto: int
    ) -> tuple[Tensor, Tensor]:
        """W-stream over layers < ``upto``: once per sample with ``context='all'`` (it does not
        depend on the current image), once per image with ``others``. Returns per-image states."""
        nq = self.num_query_tokens
        per_sample = self.context == "all"
        w = embeds if per_sample else embeds[b_idx]
        mask = mask_2d if per_sample else mask_2d[b_idx]
        if upto > 0:
            attn = self._attention_mask(w, mask)
            for layer in self.qformer.encoder.layer[:upto]:
                w = layer(w, attn, merged, query_length=nq)
        if per_sample:
            return w[b_idx], merged[b_idx]
        return w, merged

    def _attention_mask(self, hidden: Tensor, mask_2d: Tensor) -> Tensor | None:
        # The same mask builder the upstream Q-Former uses, so eager/SDPA formats stay in sync.
        return create_bidirectional_mask(
            config=self.qformer.config, inputs_embeds=hidden, attention_mask=mask_2d
        )

    # ------------------------------------------------------------------ language model

    def _assemble(
        self, visual_tokens: Tensor, image_mask: Tensor, input_ids: Tensor, attention_mask: Tensor,
        labels: Tensor | None = None, image_slots: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """[visual tokens of the present images, in order; text] per sample, left-padded.

        Left padding for every batch keeps generation and training on one layout, and explicit
        position ids make a padded sample compute exactly what it computes alone. A batch with
        ``image_slots`` (``model.image_placement=markers``) puts each image at its marker instead.
        """
        if image_slots is not None:
            from sam_mllm.models.placement import assemble_at_markers

            text = self.language_model.get_input_embeddings()(input_ids)
            return assemble_at_markers(visual_tokens, image_mask, text, attention_mask, image_slots, labels)
        b = visual_tokens.shape[0]
        nq = visual_tokens.shape[2]
        vis = visual_tokens.flatten(1, 2)
        text = self.language_model.get_input_embeddings()(input_ids)
        # Paper precision: the released code concatenated fp32 visual tokens with fp16 text embeddings
        # under autocast, which promotes the whole prompt to fp32.
        embeds = torch.cat([vis if self.precision == "paper" else vis.to(text.dtype), text], dim=1)
        keep = torch.cat([image_mask.bool().repeat_interleave(nq, dim=1), attention_mask.bool()], dim=1)
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # padding first, order kept
        embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
        keep = keep.gather(1, order)
        position_ids = (keep.long().cumsum(1) - 1).clamp(min=0)
        if labels is not None:
            labels = torch.cat([labels.new_full((b, vis.shape[1]), -100), labels], dim=1).gather(1, order)
            labels = labels.masked_fill(~keep, -100)
        return embeds, keep.long(), position_ids, labels

    def _visual_tokens(self, batch: dict) -> Perception:
        image_mask = batch["image_mask"].bool()
        if "image_embeds" in batch:
            embeds = batch["image_embeds"]
        else:
            embeds = self.encode_images(batch["pixel_values"], image_mask)
        if image_mask.shape[1] > self.max_images:
            raise ValueError(f"batch has {image_mask.shape[1]} image slots; model.max_images is {self.max_images}")
        with self._autocast("perception"):
            perception = self.perceive(embeds, image_mask, batch["qformer_input_ids"], batch["qformer_attention_mask"])
        perception.image_embeds = embeds
        return perception

    def forward(self, batch: dict) -> SAMOutput:
        """Next-token cross-entropy on the answer tokens only (``labels`` = -100 elsewhere)."""
        with self._autocast():
            perception = self._visual_tokens(batch)
            embeds, mask, positions, labels = self._assemble(
                perception.visual_tokens, batch["image_mask"], batch["input_ids"], batch["attention_mask"],
                batch["labels"], image_slots=batch.get("image_slots"),
            )
            with self._autocast("llm"):
                out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                          **completer_kwargs(self, batch, perception.image_embeds, labels,
                                                             embeds.shape[1]),
                                          **self._mmfs_inputs(perception, batch, mask.shape[1]))
        logits = out.logits
        target = labels[:, 1:]
        n_tokens = int((target != -100).sum())
        if n_tokens == 0:
            raise ValueError("batch has no answer tokens to train on (all labels are -100)")
        loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100
        )
        return SAMOutput(loss=loss, logits=logits, num_target_tokens=n_tokens, perception=perception)

    @torch.no_grad()
    def generate(self, batch: dict, return_ids: bool = False, **kwargs) -> list[str] | Tensor:
        """Answers as strings; defaults are the released code's generation settings."""
        for old, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            if old in kwargs:  # transformers would count them differently; one name, one meaning
                raise ValueError(f"generate(): use {new} (generated tokens), not {old}")
        settings = {**RELEASED_GENERATION, **kwargs}
        penalty = float(settings.pop("repetition_penalty"))
        if penalty != 1.0:
            # Our own processor: transformers derives a per-row "prompt length" from the left padding
            # of the attention mask and skips that many *generated* tokens when it is given embeddings
            # only, so padded rows would be penalised differently from the same sample alone. The
            # prompt is embeddings here, so the penalty covers generated tokens (as LAVIS did).
            settings["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)])
        tok = self.llm_tokenizer
        if tok is not None:
            settings.setdefault("pad_token_id", tok.pad_token_id)
            settings.setdefault("eos_token_id", tok.eos_token_id)
        with self._autocast():
            perception = self._visual_tokens(batch)
            embeds, mask, _, _ = self._assemble(
                perception.visual_tokens, batch["image_mask"], batch["input_ids"], batch["attention_mask"],
                image_slots=batch.get("image_slots"),
            )
            with vpgc_generating(self, batch, perception.image_embeds, embeds.shape[1]), self._autocast("llm"), \
                    self._mmfs_generating(self._mmfs_inputs(perception, batch, mask.shape[1])):
                ids = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
        if return_ids:
            return ids
        if tok is None:
            raise ValueError("this model has no LLM tokenizer; call generate(..., return_ids=True)")
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    def _mmfs_inputs(self, perception: Perception, batch: dict, seq_len: int) -> dict:
        """The ``mmfs`` keyword of the LLM call (empty without a synchronizer): the same vision
        features ``perceive`` read, and which image each assembled position may see."""
        if not hasattr(self, "mmfs"):
            return {}
        from sam_mllm.models.mmfs import SynchronizerContext, visibility_mask, vit_feature_maps

        if batch.get("image_slots") is not None:
            raise ValueError("model.image_placement=markers is not supported with MMFS yet (its visibility "
                             "follows the prefix layout); use image_placement=prefix")
        image_mask = batch["image_mask"].bool()
        features, shapes = vit_feature_maps(perception.image_embeds, self.mmfs_levels)
        starts = self._image_starts(image_mask, batch["attention_mask"], perception.visual_tokens.shape[2])
        return {"mmfs": SynchronizerContext(features, visibility_mask(starts, seq_len), image_mask, shapes)}

    @contextlib.contextmanager
    def _mmfs_generating(self, inputs: dict):
        """``generate`` refuses keywords its model's ``forward`` does not name, so the ``mmfs``
        keyword is added to every LLM call by a pre-hook while generating."""
        if not inputs:
            yield
            return
        handle = self.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, **inputs}), with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()

    def _image_starts(self, image_mask: Tensor, attention_mask: Tensor, nq: int) -> Tensor:
        """[B, N] position of each image's first visual token in ``_assemble``'s layout (-1: padded
        slot). Follows ``_assemble``: present images' ``nq`` tokens in order, then the text, left-padded."""
        keep = torch.cat([image_mask.repeat_interleave(nq, dim=1), attention_mask.bool()], dim=1)
        position = torch.argsort(torch.argsort(keep.to(torch.int8), dim=1, stable=True), dim=1)
        starts = position[:, :: nq][:, : image_mask.shape[1]]
        return starts.masked_fill(~image_mask, -1)

    def _vision_grid(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def use_paper_precision(self) -> SAMModel:
        """The released evaluation's precision: ViT (its Linear and Conv layers, as LAVIS's
        ``convert_weights_to_fp16``) and the whole LLM in fp16; Q-Former, query tokens, language
        projection and SAM's own layers stay fp32. ``_autocast`` then runs the ViT and the LLM under
        fp16 autocast and the rest outside it, as the released ``generate`` did. GPU only."""
        for module in self.vision_model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.half()
        self.language_model.half()
        self.precision = "paper"
        return self

    def _autocast(self, stage: str = "all") -> contextlib.AbstractContextManager:
        """Autocast for one stage: all (the whole call) | vision | perception | llm."""
        if self.precision == "paper":
            if stage == "all":
                return contextlib.nullcontext()
            return torch.autocast(self.device.type, dtype=torch.float16, enabled=stage in ("vision", "llm"))
        # A bf16 backbone with float32 trainable layers needs autocast to mix them.
        if (stage == "all" and self.language_model.dtype == torch.bfloat16
                and not torch.is_autocast_enabled(self.device.type)):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _scatter_images(values: Tensor, image_mask: Tensor, b: int, n: int) -> Tensor:
    """[M, ...] rows of the present images back to [B, N, ...] with zeros in padded slots."""
    out = values.new_zeros((b, n, *values.shape[1:]))
    return out.index_put(image_mask.nonzero(as_tuple=True), values)


def _layer_index(index: int, num_layers: int, name: str) -> int:
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ConfigError(f"model.{name}={index} is outside the Q-Former's {num_layers} layers")
    return resolved


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _zero_(*modules: nn.Linear) -> None:
    # Zero W_in / W_out make an untrained SAM exactly InstructBLIP (docs/DESIGN.md §1).
    for m in modules:
        if m.weight.device.type != "meta":
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
