"""The Gradio app, served on localhost and driven through gradio_client."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import sam_mllm  # noqa: E402
from sam_mllm.app import build_app, patch_weight_maps, patch_weights  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import torch

    pipe = sam_mllm.load_model("demo/sam", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # non-uniform patch weights, as after training
        pipe.model.patch_weight.weight.normal_(0, 0.5)
    app = build_app(pipe)
    app.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(app.local_url, verbose=False)
    yield pipe, client, tmp_path_factory.mktemp("uploads")
    client.close() if hasattr(client, "close") else None
    app.close()


def test_answer_and_patch_weights_come_back(served):
    pipe, client, tmp = served
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    prompt = "what object is in all images ?"
    answer, gallery = client.predict([gradio_client.handle_file(str(p)) for p in paths], prompt, 1, 8, 1.5, 1.0,
                                     api_name="/answer")
    images = [Image.open(p).convert("RGB") for p in paths]
    assert answer == pipe.generate(images, prompt, num_beams=1, max_new_tokens=8)
    assert len(gallery) == 3  # one weight map per image, in upload order


def test_patch_weights_sum_to_one_over_images(served):
    pipe, _, _ = served
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    weights = patch_weights(pipe, images)
    assert weights.shape == (2, 1 + 8 * 8) and np.allclose(weights.sum(0), 1.0, atol=1e-5)
    assert weights.std() > 0.01  # the learned scores differ between patches and images
    maps = patch_weight_maps(pipe, images)
    assert len(maps) == 2 and maps[0].size == (256, 256)


def test_bad_upload_gets_a_readable_error(served):
    _, client, tmp = served
    bad = tmp / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(Exception) as e:
        client.predict([gradio_client.handle_file(str(bad))], "what is it ?", 1, 8, 1.5, 1.0, api_name="/answer")
    assert "upload 1 (notes.png)" in str(e.value) and "cannot read image" in str(e.value)
