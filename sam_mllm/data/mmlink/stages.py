"""The stages of the MmLINK pipeline: their protocols, the data passed between them, and the
backends that need no model weights (folder and procedural sources, oracle segmenter, compositor,
template writer, procedural inpainter, oracle describer, template refiner, rule-based QC).

Model-backed backends live in ``sam_mllm.data.mmlink.models``. Each backend is registered under
its stage's registry kind (``mmlink_source``, ``mmlink_segmenter``, ...) and built from the YAML
section ``{name: ..., **options}`` of that stage; a backend's options are its constructor's keyword
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from sam_mllm.data import synthetic
from sam_mllm.registry import register

STAGES = ("source", "segmenter", "compositor", "writer", "inpainter", "describer", "refiner", "qc")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class PipelineError(ValueError):
    """Bad pipeline input or configuration; the message names the file, sample or option."""


# ------------------------------------------------------------------------------- data between stages

@dataclass
class Item:
    """One image of one identity, as the source gives it."""

    image: Image.Image  # RGB, or RGBA whose alpha is the object's mask (oracle segmentation)
    identity: str
    origin: str  # file path or procedural descriptor, for the provenance
    name: str = ""  # a short description of the identity, when the source knows one


@dataclass
class ObjectGroup:
    """The main object's two appearances and the distractors of each of the two images."""

    main: tuple[Item, Item]
    distractors: tuple[list[Item], list[Item]]


@dataclass
class Cutout:
    """An object cut out of its image: RGBA, alpha = the (binary or soft) mask, cropped to its box."""

    rgba: Image.Image
    identity: str


@dataclass
class Composition:
    """One canvas: the objects over a neutral fill, and where the inpainter may paint."""

    canvas: Image.Image  # RGB
    alpha: np.ndarray  # uint8 (H, W): coverage of all objects (the paste-back matte)
    main_alpha: np.ndarray  # uint8 (H, W): coverage of the main object alone
    layer: Image.Image  # RGBA: the objects alone, composited in paste order
    boxes: list[dict] = field(default_factory=list)  # identity, x, y, w, h per placed object

    @property
    def inpaint_mask(self) -> Image.Image:
        """White where the inpainter paints: everything not fully covered by an object."""
        return Image.fromarray(np.where(self.alpha == 255, 0, 255).astype(np.uint8), "L")


@dataclass
class Background:
    prompt: str  # the text the inpainter is conditioned on
    tag: str = ""  # a machine-readable label of the scene (the synthetic world's context key)


# ------------------------------------------------------------------------------------------ protocols

class Source(Protocol):
    def sample(self, rng: np.random.Generator) -> ObjectGroup: ...


class Segmenter(Protocol):
    model_id: str

    def segment(self, image: Image.Image) -> np.ndarray: ...  # bool (H, W)


class Compositor(Protocol):
    def compose(self, main: Cutout, others: list[Cutout], size: int, rng: np.random.Generator) -> Composition: ...


class Writer(Protocol):
    model_id: str

    def write(self, group: ObjectGroup, count: int, rng: np.random.Generator, seed: int) -> list[Background]: ...


class Inpainter(Protocol):
    model_id: str

    def inpaint(self, comp: Composition, background: Background, seed: int) -> Image.Image: ...


class Describer(Protocol):
    model_id: str

    def describe(self, item: Item, seed: int) -> str: ...


class Refiner(Protocol):
    model_id: str

    def refine(self, description: str, seed: int) -> str: ...


def torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# -------------------------------------------------------------------------------------------- sources

@register("mmlink_source", "folder")
class FolderSource:
    """``root/<identity>/*.jpg``: one folder per identity (DeepFashion-like), at least two images in
    the main identity's folder. An optional ``description.txt`` in a folder names the identity (the
    oracle describer's answer); images with an alpha channel carry their own mask."""

    def __init__(self, root: str, min_images: int = 2) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(f"source.root: folder not found: {self.root}")
        self.groups: dict[str, list[Path]] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                self.groups[folder.name] = files
        self.mains = [k for k, v in self.groups.items() if len(v) >= min_images]
        if not self.mains or len(self.groups) < 3:
            raise PipelineError(
                f"source.root {self.root}: needs >= 3 identity folders with images and >= 1 with "
                f"{min_images}+ images; found {len(self.groups)} folders, {len(self.mains)} with {min_images}+")

    def _item(self, identity: str, path: Path) -> Item:
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                image = im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") else "RGB")
        except OSError as exc:
            raise PipelineError(f"source: unreadable image {path}: {exc}") from None
        desc = path.parent / "description.txt"
        name = desc.read_text(encoding="utf-8").strip() if desc.is_file() else identity.replace("_", " ")
        return Item(image, identity, str(path.relative_to(self.root)), name)

    def sample(self, rng: np.random.Generator) -> ObjectGroup:
        main = self.mains[int(rng.integers(len(self.mains)))]
        i, j = (int(k) for k in rng.choice(len(self.groups[main]), 2, replace=False))
        others = [k for k in self.groups if k != main]
        b, c = (others[int(k)] for k in rng.choice(len(others), 2, replace=False))
        pick = lambda ident: self.groups[ident][int(rng.integers(len(self.groups[ident])))]  # noqa: E731
        return ObjectGroup(
            (self._item(main, self.groups[main][i]), self._item(main, self.groups[main][j])),
            ([self._item(b, pick(b))], [self._item(c, pick(c))]))


@register("mmlink_source", "procedural")
class ProceduralSource:
    """The synthetic world's objects (``sam_mllm.data.synthetic``) as identities: the main object
    in two poses, and per image 1-3 distractors (``distractors``) whose shape and colour both
    differ from everything else in that image and that never appear in the other image, as in the
    world's ``mmlink`` split. Sprites are RGBA, so the oracle segmenter reads their masks."""

    def __init__(self, sprite_size: int = 48, distractors: tuple[int, int] = (1, 3),
                 max_angle: float = 40.0) -> None:
        self.sprite_size, self.max_angle = int(sprite_size), float(max_angle)
        self.distractors = (int(distractors[0]), int(distractors[1]))
        if not 1 <= self.distractors[0] <= self.distractors[1]:
            raise PipelineError(f"source.distractors={list(distractors)}: need 1 <= min <= max")

    def _item(self, obj: tuple[str, str, str], rng: np.random.Generator) -> Item:
        angle = float(rng.uniform(-self.max_angle, self.max_angle))
        sprite = synthetic.render_object(*obj, self.sprite_size, angle)
        name = synthetic.object_name(*obj)
        return Item(sprite, name.replace(" ", "_"), f"procedural:{name}@{angle:.2f}", name)

    def sample(self, rng: np.random.Generator) -> ObjectGroup:
        world = synthetic._World(rng, self.sprite_size)
        main, used = world.obj(), set()
        per_image = []
        for _ in range(2):
            n = int(rng.integers(self.distractors[0], self.distractors[1] + 1))
            objs = [main]
            for _ in range(n):
                objs.append(world.obj(objs, used))
                used.add(objs[-1])
            per_image.append(objs[1:])
        return ObjectGroup((self._item(main, rng), self._item(main, rng)),
                           ([self._item(o, rng) for o in per_image[0]], [self._item(o, rng) for o in per_image[1]]))


# ------------------------------------------------------------------------------------------ segmenter

@register("mmlink_segmenter", "oracle")
class OracleSegmenter:
    """The mask an RGBA source image carries in its alpha channel (procedural sprites, pre-cut photos)."""

    model_id = "oracle"

    def __init__(self, threshold: int = 128) -> None:
        self.threshold = int(threshold)

    def segment(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGBA":
            raise PipelineError("segmenter 'oracle' needs RGBA images (the alpha is the mask); this source "
                                f"gives {image.mode}: use segmenter.name=segment_anything")
        return np.asarray(image.getchannel("A")) >= self.threshold


def cutout(item: Item, mask: np.ndarray) -> Cutout:
    """The object's pixels with the mask as alpha (soft alpha kept where the source has one),
    cropped to the mask's bounding box."""
    rgba = item.image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A")) if item.image.mode == "RGBA" else np.full(mask.shape, 255, np.uint8)
    alpha = np.where(mask, alpha, 0).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha, "L"))
    ys, xs = np.nonzero(alpha)
    if len(ys) == 0:
        return Cutout(rgba.crop((0, 0, 1, 1)), item.identity)
    return Cutout(rgba.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)), item.identity)


# ----------------------------------------------------------------------------------------- compositor

@register("mmlink_compositor", "paste")
class PasteCompositor:
    """Objects pasted onto a ``fill``-coloured canvas at random positions and sizes (the longer side
    of each object a uniform fraction ``scale`` of the canvas), overlapping each other by at most
    ``max_overlap`` of the smaller box (after ``tries`` draws that all overlap more, the last is kept);
    the main object is pasted last so none of it is hidden."""

    def __init__(self, scale: tuple[float, float] = (0.4, 0.75), max_overlap: float = 0.15,
                 fill: tuple[int, int, int] = (127, 127, 127), tries: int = 100) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise PipelineError(f"compositor.scale={list(scale)}: need 0 < min <= max <= 1")
        self.max_overlap, self.fill, self.tries = float(max_overlap), tuple(int(v) for v in fill), int(tries)

    @staticmethod
    def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
        w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
        h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
        return max(w, 0) * max(h, 0) / max(1, min(a[2] * a[3], b[2] * b[3]))

    def compose(self, main: Cutout, others: list[Cutout], size: int, rng: np.random.Generator) -> Composition:
        order = [others[int(k)] for k in rng.permutation(len(others))] + [main]
        placed: list[tuple[Cutout, Image.Image, tuple[int, int, int, int]]] = []
        for cut in order:
            w0, h0 = cut.rgba.size
            for _ in range(self.tries):
                side = rng.uniform(*self.scale) * size
                k = side / max(w0, h0)
                w, h = max(1, round(w0 * k)), max(1, round(h0 * k))
                x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                if all(self._overlap((x, y, w, h), box) <= self.max_overlap for *_, box in placed):
                    break
            placed.append((cut, cut.rgba.resize((w, h), Image.LANCZOS), (x, y, w, h)))
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        for _cut, sprite, (x, y, _w, _h) in placed:
            layer.alpha_composite(sprite, (x, y))
        main_layer = Image.new("L", (size, size), 0)
        _c, sprite, (x, y, _w, _h) = placed[-1]
        main_layer.paste(sprite.getchannel("A"), (x, y))
        canvas = Image.new("RGBA", (size, size), (*self.fill, 255))
        canvas.alpha_composite(layer)
        return Composition(canvas.convert("RGB"), np.asarray(layer.getchannel("A")).copy(),
                           np.asarray(main_layer).copy(), layer,
                           [{"identity": c.identity, "x": b[0], "y": b[1], "w": b[2], "h": b[3]}
                            for c, _s, b in placed])


def paste_back(image: Image.Image, comp: Composition) -> Image.Image:
    """The objects' layer over an inpainted image: fully covered pixels are the objects' own."""
    out = image.convert("RGBA")
    if out.size != comp.layer.size:
        out = out.resize(comp.layer.size, Image.LANCZOS)
    out.alpha_composite(comp.layer)
    return out.convert("RGB")


# ------------------------------------------------------------------------------------ background text

# The offline writer's vocabulary: place x light x style, ~500 distinct descriptions.
PLACES = ("a busy city street", "a quiet beach at the sea", "a green park with tall trees", "a snowy mountain path",
          "a cozy living room", "a modern office lobby", "a desert road", "a flower garden", "a train station platform",
          "a wooden pier on a lake", "a library with bookshelves", "a market square", "a forest trail",
          "a rooftop terrace", "a museum hall", "a countryside field", "a cafe interior", "a harbour with boats",
          "a university campus", "a stone bridge over a river")
LIGHTS = ("in the morning sun", "at golden hour", "under an overcast sky", "at night under street lights",
          "on a rainy day")
STYLES = ("photo", "high quality photo", "realistic photograph", "wide shot photo", "candid photo")


@register("mmlink_writer", "templates")
class TemplateWriter:
    """Background descriptions from templates (place x light x style): the offline default."""

    model_id = "templates"

    def __init__(self, places: list[str] | None = None, lights: list[str] | None = None,
                 styles: list[str] | None = None) -> None:
        self.places, self.lights, self.styles = list(places or PLACES), list(lights or LIGHTS), list(styles or STYLES)

    def write(self, group: ObjectGroup, count: int, rng: np.random.Generator, seed: int) -> list[Background]:
        places = rng.choice(len(self.places), count, replace=count > len(self.places))
        return [Background(f"a {self.styles[int(rng.integers(len(self.styles)))]} of "
                           f"{self.places[int(p)]}, {self.lights[int(rng.integers(len(self.lights)))]}")
                for p in places]


@register("mmlink_writer", "world_contexts")
class WorldContextWriter:
    """Distinct contexts of the synthetic world (grass, sea, ...); the procedural inpainter draws them."""

    model_id = "world_contexts"

    def write(self, group: ObjectGroup, count: int, rng: np.random.Generator, seed: int) -> list[Background]:
        keys = list(synthetic.CONTEXTS)
        return [Background(f"a scene {synthetic.CONTEXTS[keys[int(k)]]}", keys[int(k)])
                for k in rng.permutation(len(keys))[:count]]


# ------------------------------------------------------------------------------------------ inpainter

@register("mmlink_inpainter", "procedural")
class ProceduralInpainter:
    """The synthetic world's background renderer for the writer's context tag, objects on top."""

    model_id = "procedural"

    def inpaint(self, comp: Composition, background: Background, seed: int) -> Image.Image:
        if background.tag not in synthetic.CONTEXTS:
            raise PipelineError(f"inpainter 'procedural' draws the synthetic world's contexts "
                                f"({', '.join(synthetic.CONTEXTS)}); got tag {background.tag!r}: "
                                "use writer.name=world_contexts")
        size = comp.canvas.size[0]
        return synthetic.render_background(background.tag, size, np.random.default_rng(seed))


# -------------------------------------------------------------------------------- describer + refiner

@register("mmlink_describer", "oracle")
class OracleDescriber:
    """The identity's name as the source knows it (procedural objects, ``description.txt``)."""

    model_id = "oracle"

    def describe(self, item: Item, seed: int) -> str:
        return item.name


@register("mmlink_refiner", "template")
class TemplateRefiner:
    """``template.format(description=...)``; the default gives the synthetic world's answers (``a red star``)."""

    model_id = "template"

    def __init__(self, template: str = "a {description}") -> None:
        if "{description}" not in template:
            raise PipelineError(f"refiner.template {template!r} must contain {{description}}")
        self.template = template

    def refine(self, description: str, seed: int) -> str:
        return self.template.format(description=description)


# ------------------------------------------------------------------------------------------------ QC

def _largest_component_fraction(mask: np.ndarray) -> float:
    """Share of the mask's pixels in its largest 8-connected component (label propagation by
    max-pooling; no SciPy dependency)."""
    if not mask.any():
        return 0.0
    m = torch.from_numpy(mask.astype(bool))[None, None]
    labels = torch.where(m, torch.arange(1, m.numel() + 1, dtype=torch.float64).view_as(m), torch.zeros(()))
    while True:
        grown = torch.nn.functional.max_pool2d(labels, 3, 1, 1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    _, counts = torch.unique(labels[m], return_counts=True)
    return float(counts.max()) / float(m.sum())


@register("mmlink_qc", "rules")
class RuleQC:
    """Rejects a sample, with every reason recorded, when:
    - a segmentation mask covers less than ``min_mask_area`` or more than ``max_mask_area`` of its
      source image, or its largest connected part holds less than ``min_connected`` of it;
    - an object's fully covered pixels changed in inpainting (more than ``max_pixel_change`` in 0-255);
    - the answer or a background prompt is empty;
    - with ``clip_model`` set, the CLIP score of an image against its background prompt is below
      ``min_clip_score`` (cosine similarity, in [-1, 1])."""

    def __init__(self, min_mask_area: float = 0.02, max_mask_area: float = 0.95, min_connected: float = 0.9,
                 max_pixel_change: int = 0, clip_model: str | None = None, min_clip_score: float = 0.2,
                 device: str = "auto") -> None:
        self.min_mask_area, self.max_mask_area = float(min_mask_area), float(max_mask_area)
        self.min_connected, self.max_pixel_change = float(min_connected), int(max_pixel_change)
        self.clip_model, self.min_clip_score = clip_model, float(min_clip_score)
        self._clip: Any = None
        self.device = device

    def mask_reasons(self, label: str, mask: np.ndarray) -> list[str]:
        area = float(mask.mean())
        reasons = []
        if area < self.min_mask_area:
            reasons.append(f"mask of {label} covers {area:.3f} of its image (< min_mask_area {self.min_mask_area})")
        elif area > self.max_mask_area:
            reasons.append(f"mask of {label} covers {area:.3f} of its image (> max_mask_area {self.max_mask_area})")
        if area > 0:
            connected = _largest_component_fraction(mask)
            if connected < self.min_connected:
                reasons.append(f"mask of {label} is fragmented: largest part holds {connected:.3f} "
                               f"(< min_connected {self.min_connected})")
        return reasons

    def image_reasons(self, k: int, image: Image.Image, comp: Composition, background: Background,
                      metrics: dict | None = None) -> list[str]:
        """Reasons to reject image ``k``; its measurements go into ``metrics`` (for the provenance)."""
        metrics = {} if metrics is None else metrics
        reasons = []
        covered = comp.alpha == 255
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(comp.canvas, np.int16)).max(-1)[covered]
        changed = int((diff > self.max_pixel_change).sum())
        metrics.update(object_pixels=int(covered.sum()), changed_object_pixels=changed)
        if changed:
            reasons.append(f"image {k}: {changed} object pixels changed by up to {int(diff.max())} "
                           f"(> max_pixel_change {self.max_pixel_change})")
        if not background.prompt.strip():
            reasons.append(f"image {k}: empty background description")
        if self.clip_model:
            score = self.clip_score(image, background.prompt)
            metrics["clip_score"] = round(score, 6)
            if score < self.min_clip_score:
                reasons.append(f"image {k}: CLIP score {score:.3f} against its background description "
                               f"(< min_clip_score {self.min_clip_score})")
        return reasons

    def clip_score(self, image: Image.Image, text: str) -> float:
        if self._clip is None:
            from sam_mllm.data.mmlink.models import load_clip

            self._clip = load_clip(self.clip_model, self.device)
        model, processor = self._clip
        with torch.no_grad():
            inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True, truncation=True)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            out = model(**inputs)
        img, txt = out.image_embeds[0], out.text_embeds[0]
        return float(torch.nn.functional.cosine_similarity(img, txt, dim=0))

    def text_reasons(self, answer: str) -> list[str]:
        return [] if answer.strip() else ["empty answer (describer + refiner produced no text)"]


def instruction_templates(templates: list[str] | None) -> list[str]:
    """The configured instructions, or the synthetic world's MmLINK questions."""
    out = list(templates) if templates else list(synthetic.MMLINK_INSTRUCTIONS)
    if not out or not all(isinstance(t, str) and t.strip() for t in out):
        raise PipelineError("instructions: give a list of non-empty strings")
    return out


def check_size(size: int) -> int:
    if size < 16 or size % 8:
        raise PipelineError(f"image_size={size}: must be a multiple of 8 and >= 16 (the inpainting VAE works "
                            "on 8x smaller latents)")
    return size


def seed_for(run_seed: int, index: int, stage: str, part: int = 0) -> int:
    """A 63-bit seed that depends only on (run seed, sample index, stage, part)."""
    ss = np.random.SeedSequence([int(run_seed), int(index), STAGES.index(stage) if stage in STAGES else 99,
                                 int(part)])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def rng_for(run_seed: int, index: int, stage: str) -> np.random.Generator:
    return np.random.default_rng(seed_for(run_seed, index, stage))


__all__ = ["STAGES", "Background", "Composition", "Cutout", "Item", "ObjectGroup", "PipelineError", "cutout",
           "paste_back", "seed_for", "rng_for", "torch_generator", "instruction_templates", "check_size"]
