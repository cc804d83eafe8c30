"""Issue 31, item 8: the page's Generate button sits beside the prompt, the image inputs in a collapsed section;
bad requests are one line in the server log; the console's public-link hint names `--share`."""
import logging
import socket

import pytest

from latent_diffusion.apps.webui import Studio, refusal
from test_webui import ImageInputsPipe, tiny_pipe  # noqa: F401 (a fixture)

gr = pytest.importorskip("gradio")


def by_label(demo, cls, label):
    [block] = [b for b in demo.blocks.values() if isinstance(b, cls) and getattr(b, "label", None) == label]
    return block


def enclosing(block, cls):
    """The nearest enclosing layout of type `cls` (gradio wraps form fields in a Form)."""
    while block is not None and not isinstance(block, cls):
        block = block.parent
    return block


def test_generate_sits_beside_the_prompt_and_image_inputs_are_collapsed(tiny_pipe, tmp_path):  # noqa: F811
    from latent_diffusion.apps.webui import build_app

    demo = build_app(Studio(ImageInputsPipe(tiny_pipe), None, tmp_path))
    prompt = by_label(demo, gr.Textbox, "Prompt")
    [button] = [b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Generate"]
    row = enclosing(prompt, gr.Row)
    assert row is not None and enclosing(button, gr.Row) is row
    accordion = enclosing(by_label(demo, gr.Image, "Init image (img2img)"), gr.Accordion)
    assert accordion is not None and accordion.open is False
    assert enclosing(by_label(demo, gr.ImageMask, "Inpainting mask: paint where to repaint"), gr.Accordion) is accordion
    assert enclosing(prompt, gr.Accordion) is None


def test_refusal_is_one_log_line_and_no_traceback(caplog):
    with caplog.at_level(logging.WARNING, logger="latent_diffusion.apps.webui"):
        error = refusal(gr, ValueError("num_inference_steps must be >= 1, got -3"))
    assert isinstance(error, gr.Error) and error.print_exception is False
    assert str(error.message) == "steps: num_inference_steps must be >= 1, got -3"
    [record] = caplog.records
    assert record.getMessage() == "refused a request: steps: num_inference_steps must be >= 1, got -3"


def test_console_hint_names_the_share_flag(tiny_pipe, tmp_path, capfd):  # noqa: F811
    from latent_diffusion.apps.webui import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = serve(tiny_pipe, port=port, output_dir=tmp_path, example=False, block=False)
    try:
        out = capfd.readouterr().out
    finally:
        demo.close()
    assert f"Running on http://127.0.0.1:{port}/" in out
    assert "latent-diffusion serve --share" in out and "share=True" not in out
