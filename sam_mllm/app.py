"""``python -m sam_mllm.app [--config demo/sam] [--checkpoint FOLDER|user/repo]`` — try a model in the browser.

Upload several images (their order is the order the model sees), ask a question, set the
generation, read the answer. For variants with adaptive patch weighting the app also shows, over
each image, the weight the merged context gives that image at every patch: where the guidance
draws its information from. Without arguments it serves the embedded demo model (the committed
tiny backbone with SAM's layers untrained); pass --checkpoint runs/demo/sam/final after
`python -m sam_mllm.demo` for the trained one. Needs the `app` extra: pip install -e ".[app]".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sam_mllm import cli

DEFAULT_CONFIG = "demo/sam"


def build_parser():
    p = cli.parser("sam_mllm.app", __doc__)
    p.add_argument("--config", default=None,
                   help=f"config name or file (default: {DEFAULT_CONFIG}, or the checkpoint's own config)")
    p.add_argument("--checkpoint", default=None, help="trained folder (runs/x/final), exported folder or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.context=others")
    return p


if __name__ == "__main__":  # --help answers here; torch and gradio are imported only to serve
    cli.answer_early("sam_mllm.app", build_parser=build_parser)


def patch_weights(pipe, images: Sequence):
    """[N, P] weight of each image in the merged context at every patch (summing to 1 over images),
    or None where the variant has no adaptive weighting or its context differs per image."""
    import torch

    model = pipe.model
    if model.guidance == "none" or model.patch_weighting != "adaptive" or model.context != "all":
        return None
    transform = pipe.processor.transform(train=False)
    pixels = torch.stack([transform(im) for im in images])[None].to(model.device)
    mask = torch.ones(1, len(images), dtype=torch.bool, device=model.device)
    with torch.no_grad():
        embeds = model.encode_images(pixels.to(model.vision_model.dtype), mask)
        _, weights = model.merge_context(embeds, mask)  # [1, N, P]
    return weights[0].float().cpu().numpy()


def patch_weight_maps(pipe, images: Sequence) -> list | None:
    """Per image, a picture of :func:`patch_weights` over it (a fixed 0..1 colour scale, so images compare)."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    weights = patch_weights(pipe, images)
    if weights is None:
        return None
    side = int(round((weights.shape[1] - 1) ** 0.5))
    if side * side != weights.shape[1] - 1:  # not a class token + square grid: draw nothing rather than guess
        return None
    heat = colormaps["magma"]
    out = []
    for im, w in zip(images, weights):
        grid = w[1:].reshape(side, side)  # position 0 is the ViT's class token
        base = im.convert("RGB").resize((256, 256))
        colour = (heat(grid)[..., :3] * 255).astype(np.uint8)
        out.append(Image.blend(base, Image.fromarray(colour).resize((256, 256), Image.NEAREST), 0.55))
    return out


def build_app(pipe, title: str = "sam_mllm"):
    """The Gradio Blocks around a :class:`sam_mllm.api.Pipeline`; its API name is ``/answer``."""
    import gradio as gr

    from sam_mllm.data.processing import load_image
    from sam_mllm.errors import UserError

    gen = pipe.generation
    model_name = pipe.cfg.model.name

    def answer(files, prompt, num_beams, max_new_tokens, repetition_penalty, length_penalty):
        if not files:
            raise gr.Error("Upload at least one image.")
        if not (prompt or "").strip():
            raise gr.Error("Write a question or instruction.")
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]
        try:
            # The pipeline's image mode (upright by default: phone photos keep their EXIF orientation).
            images = [load_image(p, f"upload {i + 1} ({Path(p).name}): ", pipe.image_mode) for i, p in enumerate(paths)]
            text = pipe.generate(images, prompt, num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                                 repetition_penalty=float(repetition_penalty), length_penalty=float(length_penalty))
        except (UserError, ValueError) as exc:  # bad upload, too many images: the message says which
            raise gr.Error(cli.one_line(exc)) from None
        maps = patch_weight_maps(pipe, images)
        return text, [(m, f"image {i + 1}") for i, m in enumerate(maps or [])]

    with gr.Blocks(title=title) as app:
        m = pipe.cfg.model
        gr.Markdown(f"## {title}\nModel `{model_name}` on `{m.backbone if m.dims is None else m.dims}`, "
                    f"at most {pipe.model.max_images} images, seen in upload order.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="images, in order", file_count="multiple", file_types=["image"],
                                type="filepath")
                prompt = gr.Textbox(label="question or instruction", lines=2)
                with gr.Accordion("generation", open=False):
                    beams = gr.Slider(1, 8, value=gen["num_beams"], step=1, label="beams")
                    length = gr.Slider(1, 256, value=gen["max_new_tokens"], step=1, label="max new tokens")
                    rep = gr.Slider(1.0, 2.0, value=gen["repetition_penalty"], step=0.05,
                                    label="repetition penalty")
                    lp = gr.Slider(0.0, 2.0, value=gen["length_penalty"], step=0.1, label="length penalty")
                go = gr.Button("Answer", variant="primary")
            with gr.Column():
                out = gr.Textbox(label="answer", lines=4)
                maps = gr.Gallery(label="adaptive patch weights: each image's share of the merged context "
                                        "per patch (dark = little, bright = most)", columns=4, height="auto")
        go.click(answer, [files, prompt, beams, length, rep, lp], [out, maps], api_name="answer")
    return app


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a lab machine
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('error: the app needs gradio: pip install -e ".[app]"') from None
    import sam_mllm

    config = args.config or (None if args.checkpoint else DEFAULT_CONFIG)
    pipe = sam_mllm.load_model(config, checkpoint=args.checkpoint, overrides=args.overrides)
    title = f"sam_mllm: {pipe.cfg.model.name}" + (f" ({args.checkpoint})" if args.checkpoint else " (untrained)")
    build_app(pipe, title).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
