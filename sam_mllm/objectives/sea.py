"""SEA — Supervised Embedding Alignment (arXiv 2408.11813) as a training objective.

``L = L_CE + λ·L_SEA`` (Eq. 11). Every equation of the paper is one function below, pinned by
tests/test_sea.py against references written in the test:

- Eq. 6  :func:`patch_labels` — top-n words per patch by (negated) cosine similarity, scores <= 0 dropped;
- Eq. 7  :func:`normalize_scores` and :func:`draw` — similarity-weighted, seeded sampling of one label;
- §4.2   :func:`window_patches` (one patch per k x k window) and :func:`deduplicate` (one token per label);
- Eq. 8  :func:`label_embeddings` — mean of the frozen LLM input embeddings of a label's sub-words;
- Eq. 9  :func:`sea_loss` — symmetric InfoNCE with cosine similarity and a learnable temperature.

Two ways of pairing visual tokens with patch labels (design study §1.7):

- ``perceiver='mlp'`` (variant ``llava_mlp``, SEA's own setting): token i *is* patch i, so SEA
  applies exactly: one patch per 2x2 window, its label drawn from its own distribution.
- Q-Former perceivers (``instructblip``, ``sam``, ...): *label-then-mix*. A query token has no patch;
  its label distribution is the mixture of the patch distributions weighted by the frozen Q-Former's
  own cross-attention probabilities (:func:`query_attribution`, recomputed by a forward hook with the
  attention module's own projections, so it works under SDPA). These maps come from the frozen
  InstructBLIP Q-Former; under SAM's default l = k = last layer the guidance enters after the last
  cross-attention layer, so they are exactly SAM's Q-stream maps.

Every random draw is a pure function of (run seed, step, sample id, image, token): a resumed run, a
different batch composition or a different number of processes draws the same labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTRIBUTION = ("mean", "last")
# Purposes of the seeded uniforms (kept apart so that changing one rule never shifts another's draws).
_LABEL, _WINDOW, _DEDUP = 0, 1, 2


# ------------------------------------------------------------------------------------ Eqs. 6 and 7


def patch_labels(patch_embeds: Tensor, word_embeds: Tensor, top_n: int, negate: bool = True) -> tuple[Tensor, Tensor]:
    """Eq. 6: the ``top_n`` words of every patch and their scores.

    ``s = -cos(v_i, t_j)`` when ``negate`` (the paper, after CLIP Surgery's inverted patch-text
    similarity), ``+cos`` otherwise. Scores <= 0 are dropped (id -1, score 0), so a patch may keep
    fewer than ``top_n`` labels or none. Returns ids [..., n] (long) and scores [..., n] (float32).
    """
    sim = F.normalize(patch_embeds.float(), dim=-1) @ F.normalize(word_embeds.float(), dim=-1).T
    if negate:
        sim = -sim
    scores, ids = sim.topk(min(top_n, sim.shape[-1]), dim=-1)
    keep = scores > 0
    return ids.masked_fill(~keep, -1), scores.masked_fill(~keep, 0.0)


def normalize_scores(scores: Tensor) -> Tensor:
    """Eq. 7: ``S_norm = S / sum(S)`` per patch; a patch without positive score stays all zero."""
    total = scores.sum(-1, keepdim=True)
    return torch.where(total > 0, scores / torch.where(total > 0, total, torch.ones_like(total)), 0.0)


def seeded_uniform(*keys: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) that are a pure function of integer keys (broadcast together).

    A counter-based hash (splitmix64 chained over the keys): no generator state, so a draw depends
    only on what it is for, never on which process or batch computes it.
    """
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in arrays:
            h = h ^ k.astype(np.uint64)
            h = h + np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def sample_key(sample_id: object) -> int:
    """A stable 63-bit integer for a sample id of any type (str or int ids of the schema)."""
    return int.from_bytes(hashlib.blake2b(repr(sample_id).encode(), digest_size=8).digest(), "little") >> 1


def draw(probs: Tensor, u: np.ndarray | Tensor) -> Tensor:
    """Eq. 7's sampling: one column index per row of ``probs`` [T, K] by inverse CDF at ``u`` [T].

    Rows need not be normalised; a row without positive mass gives -1.
    """
    p = probs.detach().double().clamp_min(0)
    cdf = p.cumsum(-1)
    total = cdf[:, -1] if p.shape[-1] else p.new_zeros(p.shape[0])
    u = torch.as_tensor(u, dtype=torch.float64, device=p.device)
    idx = torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(-1).clamp(max=max(p.shape[-1] - 1, 0))
    return torch.where(total > 0, idx, torch.full_like(idx, -1))


# ---------------------------------------------------------------------------- localized sampling


def window_patches(labelled: Tensor, grid: int, window: int, u: np.ndarray) -> list[int]:
    """§4.2: one patch per ``window x window`` window of a ``grid x grid`` patch grid (row-major).

    ``labelled`` [grid*grid] bool marks patches that have a label; a window picks one of its labelled
    patches uniformly with ``u`` [grid*grid] (the uniform stored at the window's first patch is used)
    and is skipped when none is labelled. Edge windows of a grid not divisible by ``window`` are smaller.
    """
    if labelled.numel() != grid * grid:
        raise ValueError(f"SEA: {labelled.numel()} patch labels for a {grid}x{grid} patch grid")
    flags = labelled.tolist()
    picked = []
    for top in range(0, grid, window):
        for left in range(0, grid, window):
            cells = [r * grid + c for r in range(top, min(top + window, grid))
                     for c in range(left, min(left + window, grid)) if flags[r * grid + c]]
            if cells:
                picked.append(cells[int(u[top * grid + left] * len(cells))])
    return picked


def deduplicate(labels: Sequence[int], priority: Sequence[float]) -> list[int]:
    """§4.2: of the tokens that drew the same label, keep one (the lowest seeded ``priority``), so
    every contrastive negative is a true negative. Returns the kept positions, in input order."""
    best: dict[int, int] = {}
    for i, (label, p) in enumerate(zip(labels, priority)):
        if label not in best or p < priority[best[label]]:
            best[label] = i
    return sorted(best.values())


# ------------------------------------------------------------------------------------ Eqs. 8 and 9


def word_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Sub-word ids of every label word as the LLM reads it mid-sentence (no BOS/EOS; a
    SentencePiece tokenizer gives the word its leading-space piece). Unencodable words are an error."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out, bad = [], []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if not ids or (unk is not None and unk in ids):
            bad.append(w)
        out.append(ids)
    if bad:
        raise ValueError(f"SEA word list: the LLM tokenizer cannot encode {len(bad)} word(s), e.g. {bad[:8]}")
    return out


def label_embeddings(embedding: Tensor, token_ids: Tensor, token_mask: Tensor) -> Tensor:
    """Eq. 8: ``t = (1/M) sum_k Psi(w^k)`` — mean of the (frozen) input-embedding rows of each label's
    ``M`` sub-words. ``token_ids``/``token_mask``: [L, Mmax] padded sub-word ids of L labels."""
    rows = embedding.detach()[token_ids] * token_mask[..., None].to(embedding.dtype)
    return rows.sum(1) / token_mask.sum(1, keepdim=True).to(embedding.dtype)


def sea_loss(visual: Tensor, text: Tensor, tau: Tensor | float) -> Tensor:
    """Eq. 9: symmetric InfoNCE over N pairs (x_i, t_i) with cosine similarity and temperature τ.

    ``-1/(2N) sum_i [log softmax_j(phi(x_i, t_j)/τ)_i + log softmax_j(phi(t_i, x_j)/τ)_i]``.
    """
    logits = F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / tau
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ------------------------------------------------------------------------ label-then-mix (Q-Former)


@contextlib.contextmanager
def cross_attention_probs(qformer: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the cross-attention probabilities [M, heads, queries, P] of every cross-attention layer
    of a transformers Q-Former while the block runs.

    A forward hook on each ``crossattention.attention`` module recomputes
    ``softmax(query(h) key(F)^T * scaling + mask)`` with the module's own Linear layers from the
    inputs the module was called with: no copied model code, and it works whichever attention
    implementation (eager, SDPA) computed the layer's output.
    """
    maps: list[Tensor] = []

    def hook(module, args, kwargs, output) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        enc = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_attention_mask")
        d = module.attention_head_size
        q = module.query(hidden).view(*hidden.shape[:-1], -1, d).transpose(1, 2)
        k = module.key(enc).view(*enc.shape[:-1], -1, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * module.scaling
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        maps.append(torch.softmax(scores, dim=-1))

    handles = [layer.crossattention.attention.register_forward_hook(hook, with_kwargs=True)
               for layer in qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def query_attribution(model, image_embeds: Tensor, image_mask: Tensor, qformer_input_ids: Tensor,
                      qformer_attention_mask: Tensor, mode: str = "mean") -> Tensor:
    """a_q: per present image (rows of ``image_mask.nonzero()``) and query, a distribution over the
    image's patches (CLS dropped) [M, num_query, P-1], from the frozen Q-Former's cross-attention,
    averaged over heads and over all cross-attention layers (``mean``) or the last one (``last``)."""
    if mode not in ATTRIBUTION:
        raise ValueError(f"sea.attribution={mode!r} is not one of {', '.join(ATTRIBUTION)}")
    mask = image_mask.bool()
    b_idx, n_idx = mask.nonzero(as_tuple=True)
    feats = image_embeds[b_idx, n_idx]
    nq = model.query_tokens.shape[1]
    text_mask = qformer_attention_mask[b_idx].long()
    with cross_attention_probs(model.qformer) as maps:
        model.qformer(input_ids=qformer_input_ids[b_idx],
                      attention_mask=torch.cat([text_mask.new_ones(len(b_idx), nq), text_mask], dim=1),
                      query_embeds=model.query_tokens.expand(len(b_idx), -1, -1), encoder_hidden_states=feats)
    probs = torch.stack(maps if mode == "mean" else maps[-1:]).float().mean(dim=(0, 2))  # [M, nq, P]
    patches = probs[..., 1:]
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def mix_labels(attribution: Tensor, ids: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """pi_q(w) = sum_j a_q[j] S_norm_j(w): per-token label distributions of one image.

    ``attribution`` [Q, P], ``ids``/``probs`` [P, n] (ids -1 = no label). Returns the words present
    (sorted ids [U]) and the mixtures [Q, U].
    """
    valid = ids >= 0
    words, inverse = torch.unique(ids[valid], return_inverse=True)
    dense = attribution.new_zeros(ids.shape[0], len(words))
    rows = valid.nonzero(as_tuple=True)[0]
    dense.index_put_((rows, inverse), probs[valid].to(dense.dtype), accumulate=True)
    return words, attribution @ dense


# ------------------------------------------------------------------------------------- the objective


def collate_patch_labels(items: Sequence[dict]) -> Tensor:
    """Per-item ``patch_labels`` [n_images, P-1, top_n, 2] (word id, S_norm) padded along the image
    axis like the collator pads images; padded slots hold id -1 and probability 0 (no label)."""
    first = items[0]["patch_labels"]
    n_max = max(len(it["patch_labels"]) for it in items)
    out = first.new_zeros((len(items), n_max, *first.shape[1:]))
    out[..., 0] = -1
    for i, it in enumerate(items):
        out[i, : len(it["patch_labels"])] = it["patch_labels"]
    return out


@dataclass
class SEAResult:
    loss: Tensor  # Eq. 9 (0 with a graph to τ when fewer than two pairs remain)
    num_pairs: int
    accuracy: float  # share of pairs whose own label is the nearest label embedding (cosine); 0 if < 2 pairs
    tau: float


class SEAObjective(nn.Module):
    """Holds the learnable temperature and computes L_SEA for a batch.

    Not part of the model: SEA adds nothing at inference. ``log_tau`` is trained with the model's
    trainable groups and is saved in the training state (a resumed run continues it).
    """

    def __init__(self, words: Sequence[str], llm_tokenizer, *, seed: int = 0, init_log_tau: float = 0.0,
                 min_tau: float = 0.01, window: int = 2, attribution: str = "mean") -> None:
        super().__init__()
        if attribution not in ATTRIBUTION:
            raise ValueError(f"sea.attribution={attribution!r} is not one of {', '.join(ATTRIBUTION)}")
        if window < 1:
            raise ValueError(f"sea.window must be >= 1, got {window}")
        self.words = list(words)
        self.seed, self.min_tau, self.window, self.attribution = seed, min_tau, window, attribution
        self.log_tau = nn.Parameter(torch.tensor(float(init_log_tau)))
        ids = word_token_ids(llm_tokenizer, self.words)
        width = max(map(len, ids))
        self.register_buffer("word_ids", torch.tensor([i + [0] * (width - len(i)) for i in ids]), persistent=False)
        self.register_buffer("word_mask", torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]).bool(),
                             persistent=False)

    @property
    def tau(self) -> Tensor:
        """The temperature of Eq. 9."""
        # τ = exp(log τ), kept >= min_tau as CLIP keeps its logit scale <= 100.
        return self.log_tau.exp().clamp(min=self.min_tau)

    def draw_labels(self, model, batch: dict, perception, sample_ids: Sequence,
                    step: int) -> list[tuple[int, int, int, int, float]]:
        """Before de-duplication: (sample, image, token, word id, de-duplication priority) of every token
        that drew a label. Only present images (``image_mask``) take part."""
        labels = batch["patch_labels"]  # [B, N, P-1, n, 2]
        image_mask = batch["image_mask"].bool()
        b_idx, n_idx = image_mask.nonzero(as_tuple=True)
        ids_all, probs_all = labels[b_idx, n_idx, ..., 0].long(), labels[b_idx, n_idx, ..., 1]
        exact = getattr(model, "perceiver", "qformer") == "mlp"
        if not exact:
            attribution = query_attribution(model, perception.image_embeds, image_mask, batch["qformer_input_ids"],
                                            batch["qformer_attention_mask"], self.attribution)
        drawn = []
        for m, (b, n) in enumerate(zip(b_idx.tolist(), n_idx.tolist())):
            key = (self.seed, step, sample_key(sample_ids[b]), n)
            ids, probs = ids_all[m], probs_all[m]
            if exact:  # token i is patch i; one patch per window; its label from its own S_norm
                grid = math.isqrt(ids.shape[0])
                picked = window_patches((probs > 0).any(-1), grid, self.window,
                                        seeded_uniform(*key, np.arange(ids.shape[0]), _WINDOW))
                if not picked:
                    continue
                at = torch.tensor(picked, device=ids.device)
                choice = draw(probs[at], seeded_uniform(*key, picked, _LABEL))
                token_words = ids[at].gather(1, choice.clamp(min=0)[:, None]).squeeze(1)
                positions = picked
            else:  # label-then-mix: each query's label from its attention-weighted mixture
                words, mixture = mix_labels(attribution[m], ids, probs)
                positions = list(range(mixture.shape[0]))
                choice = draw(mixture, seeded_uniform(*key, positions, _LABEL))
                token_words = words[choice.clamp(min=0)] if len(words) else choice
            ok = (choice >= 0).tolist()
            u = seeded_uniform(*key, positions, _DEDUP)
            words_drawn = token_words.tolist()
            drawn += [(b, n, pos, words_drawn[j], float(u[j])) for j, pos in enumerate(positions) if ok[j]]
        return drawn

    def pairs(self, model, batch: dict, perception, sample_ids: Sequence, step: int) -> tuple[Tensor, Tensor]:
        """(visual tokens [N, D] with their graph, label word ids [N]) after sampling and de-duplication."""
        drawn = self.draw_labels(model, batch, perception, sample_ids, step)
        keep = [drawn[i] for i in deduplicate([d[3] for d in drawn], [d[4] for d in drawn])]
        device = perception.visual_tokens.device
        index = torch.tensor([d[:3] for d in keep], dtype=torch.long, device=device).view(-1, 3)
        tokens = perception.visual_tokens[index[:, 0], index[:, 1], index[:, 2]]
        return tokens, torch.tensor([d[3] for d in keep], dtype=torch.long, device=device)

    def forward(self, model, batch: dict, perception, sample_ids: Sequence, step: int) -> SEAResult:
        visual, words = self.pairs(model, batch, perception, sample_ids, step)
        tau = self.tau
        if len(words) < 2:  # nothing to contrast; keep τ in the graph so every replica has its gradient
            return SEAResult(self.log_tau * 0.0, len(words), 0.0, float(tau.detach()))
        embedding = model.language_model.get_input_embeddings().weight
        text = label_embeddings(embedding, self.word_ids[words], self.word_mask[words])
        loss = sea_loss(visual, text, tau)
        with torch.no_grad():
            sim = F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
            accuracy = float((sim.argmax(-1) == torch.arange(len(sim), device=sim.device)).float().mean())
        return SEAResult(loss, len(words), accuracy, float(tau.detach()))


# ------------------------------------------------------------------------------ recalled words (Fig. 1)


@torch.no_grad()
def recalled_words(model, batch: dict, top: int = 6) -> list[list[str]]:
    """The paper's Fig. 1 diagnostic: the LLM input embedding nearest (cosine) to each visual token,
    over the whole LLM vocabulary except special tokens. Per sample and present image, the recalled
    words by frequency (``word×count``), at most ``top`` of them. Adds nothing to generation."""
    tok = model.llm_tokenizer
    perception = model._visual_tokens(batch)
    table = F.normalize(model.language_model.get_input_embeddings().weight.float(), dim=-1)
    special = torch.tensor(sorted(set(tok.all_special_ids)), device=table.device, dtype=torch.long)
    mask = batch["image_mask"].bool()
    out: list[list[str]] = []
    for b in range(mask.shape[0]):
        per_image = []
        for n in mask[b].nonzero().flatten().tolist():
            sim = F.normalize(perception.visual_tokens[b, n].float(), dim=-1) @ table.T
            sim[:, special] = float("-inf")
            ids, counts = torch.unique(sim.argmax(-1), return_counts=True)
            order = counts.argsort(descending=True, stable=True)[:top]
            words = [f"{tok.convert_ids_to_tokens(int(ids[i]))}×{int(counts[i])}" for i in order]
            per_image.append(" ".join(words))
        out.append(per_image)
    return out


@torch.no_grad()
def recalled_word_accuracy(model, batch: dict, objective: SEAObjective) -> tuple[int, int]:
    """(hits, tokens): a visual token is a hit when the label word whose Eq. 8 embedding is nearest to
    it (cosine, among the labeller's words) is the token's most likely label — its patch's top label
    (``perceiver='mlp'``) or the top word of its attention mixture (Q-Former). Tokens without any
    label do not count. Needs ``batch['patch_labels']`` like training."""
    perception = model._visual_tokens(batch)
    embedding = model.language_model.get_input_embeddings().weight
    words = F.normalize(label_embeddings(embedding, objective.word_ids, objective.word_mask).float(), dim=-1)
    mask = batch["image_mask"].bool()
    b_idx, n_idx = mask.nonzero(as_tuple=True)
    labels = batch["patch_labels"][b_idx, n_idx]
    ids, probs = labels[..., 0].long(), labels[..., 1]
    if getattr(model, "perceiver", "qformer") == "mlp":
        top = ids.gather(-1, probs.argmax(-1, keepdim=True)).squeeze(-1)  # [M, P-1]
        top = top.masked_fill(probs.sum(-1) <= 0, -1)
    else:
        att = query_attribution(model, perception.image_embeds, mask, batch["qformer_input_ids"],
                                batch["qformer_attention_mask"], objective.attribution)
        top = []
        for m in range(len(b_idx)):
            present, mixture = mix_labels(att[m], ids[m], probs[m])
            best = present[mixture.argmax(-1)] if len(present) else torch.full((att.shape[1],), -1)
            top.append(best.masked_fill(mixture.sum(-1) <= 0, -1) if len(present) else best)
        top = torch.stack(top)
    tokens = F.normalize(perception.visual_tokens[b_idx, n_idx].float(), dim=-1)
    nearest = (tokens @ words.T).argmax(-1)
    valid = top >= 0
    return int((nearest == top)[valid].sum()), int(valid.sum())
