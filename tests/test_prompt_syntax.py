"""A1111 prompt syntax: the parser, and the conditioning checked against a reference written here.

The reference follows A1111's documented rules by other means than the library: weights are found per
character (the product of the factors of the brackets around it), A1111's token loop is replayed one
token at a time, and every chunk goes through the text encoder on its own.
"""
import re

import pytest
import torch

from latent_diffusion.text.prompt_syntax import parse_emphasis

LONG = ", ".join(["a red circle above a blue square"] * 12)  # ~ 90 tokens: two chunks
TABLE = [
    "a (red) circle",
    "a ((red)) circle above [a blue square]",
    "(red circle:1.5) above [[blue]] square",
    "a (red [circle:0.5]) (above:1.3) a square",
    r"a \(red\) circle \[x\]",
    "a red circle BREAK a blue square",
    "BREAK a red circle",
    "a red BREAK BREAK circle",
    "(a red circle BREAK above a square:1.2)",
    "(" + LONG + ":1.2), a cat on a sofa",
    LONG + " BREAK a (cat) on a sofa",
    "a (red circle:-0.5) above a square",
]
MALFORMED = ["a (red circle", "a red) circle]", "(x:abc)", "(x:1.2.3)", "[[[a", "a \\ b", "((", ":)", "(:1.2)",
             "BREAK", "", "(BREAK:2)"]


# ----------------------------------------------------------------------------- reference implementation


def reference_fragments(prompt):
    """A1111's rules per character: each character's weight is the product of its brackets' factors."""
    chars, stack, factors = [], [], {}  # chars: (char, tuple of bracket ids around it)
    i = 0
    while i < len(prompt):
        c = prompt[i]
        weight = re.match(r":\s*([+-]?(\d+\.?\d*|\.\d+))\s*\)", prompt[i:])
        if c == "\\":
            if i + 1 < len(prompt) and prompt[i + 1] in "()[]\\":
                chars.append((prompt[i + 1], tuple(stack)))
            i += 2 if i + 1 < len(prompt) and prompt[i + 1] in "()[]\\" else 1
            continue
        if c in "([":
            stack.append((c, i))
        elif weight and any(b[0] == "(" for b in stack):
            closing = [b for b in stack if b[0] == "("][-1]
            stack.remove(closing)
            factors[closing] = float(weight.group(1))
            i += weight.end()
            continue
        elif c in ")]" and any(b[0] == {")": "(", "]": "["}[c] for b in stack):
            closing = [b for b in stack if b[0] == {")": "(", "]": "["}[c]][-1]
            stack.remove(closing)
            factors[closing] = 1.1 if c == ")" else 1 / 1.1
        else:
            chars.append((c, tuple(stack)))
        i += 1
    default = {"(": 1.1, "[": 1 / 1.1}
    groups = []
    for c, brackets in chars:
        w = 1.0
        for b in brackets:
            w *= factors.get(b, default[b[0]])
        if groups and abs(groups[-1][1] - w) < 1e-12:
            groups[-1][0] += c
        else:
            groups.append([c, w])
    out = []
    for text, w in groups or [["", 1.0]]:
        for k, part in enumerate(re.split(r"\s*\bBREAK\b\s*", text)):
            if k:
                out.append(("BREAK", None))
            out.append((part, w))
    return out


def reference_chunks(tokenizer, prompt):
    """A1111's token loop: chunks of 75 (token, weight); a BREAK closes the chunk even when empty."""
    items = []
    for text, w in reference_fragments(prompt):
        if w is None:
            items.append(None)
        else:
            items += [(t, w) for t in tokenizer(text, add_special_tokens=False).input_ids]
    chunks, current = [], []
    for item in items:
        if item is None:
            chunks.append(current)
            current = []
            continue
        if len(current) == 75:
            chunks.append(current)
            current = []
        current.append(item)
    if current or not chunks:
        chunks.append(current)
    return chunks


def reference_encode(tokenizer, encoder, prompt, num_chunks, layer, final_norm=False):
    """Each chunk encoded alone (hidden states `layer`, through the final layer norm for SD), weighted, its mean
    restored; chunks concatenated. (hidden, pooled of chunk 0)."""
    pad = tokenizer.pad_token_id
    states, pooled = [], None
    chunks = reference_chunks(tokenizer, prompt)
    chunks = chunks + [[]] * (num_chunks - len(chunks))
    for k, chunk in enumerate(chunks):
        ids = [tokenizer.bos_token_id] + [t for t, _ in chunk] + [tokenizer.eos_token_id]
        ids += [pad] * (77 - len(ids))
        weights = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[layer][0]
        if final_norm:
            z = getattr(encoder, "text_model", encoder).final_layer_norm(z)
        if k == 0 and out[0].ndim == 2:
            pooled = out[0][0]
        weighted = z * weights[:, None]
        states.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(states), pooled


# ----------------------------------------------------------------------------- tests


def _with_layer_norm_bias(pipe):
    """Real CLIP's final LayerNorm has a bias; the tiny one's is zero, so each token's states would average
    to 0 and a chunk's mean (the emphasis' denominator) to rounding noise."""
    torch.manual_seed(0)
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            getattr(encoder, "text_model", encoder).final_layer_norm.bias.data.normal_(0.5, 0.5)
    return pipe


@pytest.fixture(scope="module")
def sd_pipe(sd_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    return _with_layer_norm_bias(LatentDiffusionPipeline.from_pretrained(sd_folder))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    return LatentDiffusionPipeline.from_pretrained(sdxl_folder)


@pytest.mark.parametrize("prompt, expected", [
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("(b:1.5) [c]", [("b", 1.5), (" ", 1.0), ("c", 1 / 1.1)]),
    (r"\(b\) \[c\] \\", [("(b) [c] \\", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("(x:abc)", [("x:abc", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("(open [both", [("open ", 1.1), ("both", 1.1 / 1.1)]),
    ("", [("", 1.0)]),
    ("aBREAKb BREAKING", [("aBREAKb BREAKING", 1.0)]),
])
def test_parse_table(prompt, expected):
    got = parse_emphasis(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [None if w is None else round(w, 9) for _, w in got] == [None if w is None else round(w, 9)
                                                                    for _, w in expected]


@pytest.mark.parametrize("prompt", TABLE + MALFORMED)
def test_parser_agrees_with_reference(prompt):
    got, ref = parse_emphasis(prompt), reference_fragments(prompt)
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert [(w is None, w and round(w, 9)) for _, w in got] == [(w is None, w and round(w, 9)) for _, w in ref]


def _sd_reference(pipe, prompts, clip_skip=None):
    tok, enc = pipe.tokenizer, pipe.text_encoder
    chunks = max(len(reference_chunks(tok, p)) for p in prompts)
    layer = -1 if not clip_skip else -(clip_skip + 1)
    return torch.stack([reference_encode(tok, enc, p, chunks, layer, final_norm=True)[0] for p in prompts])


@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("prompt", TABLE)
def test_sd_conditioning_matches_reference(sd_pipe, prompt, clip_skip):
    negative = "[blurry], (ugly:1.3)"
    with torch.no_grad():
        cond = sd_pipe.conditioner().encode([prompt], [negative], clip_skip=clip_skip, prompt_syntax="a1111")
        ref = _sd_reference(sd_pipe, [negative, prompt], clip_skip)
    assert cond.context.shape == ref.shape
    torch.testing.assert_close(cond.context, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", [TABLE[1], TABLE[5], TABLE[9], TABLE[10]])
def test_sdxl_conditioning_matches_reference(sdxl_pipe, prompt):
    negative = "(ugly:1.3)"
    pairs = [(sdxl_pipe.tokenizer, sdxl_pipe.text_encoder), (sdxl_pipe.tokenizer_2, sdxl_pipe.text_encoder_2)]
    with torch.no_grad():
        cond = sdxl_pipe.conditioner().encode([prompt], [negative], size=(32, 32), prompt_syntax="a1111")
        chunks = max(len(reference_chunks(tok, p)) for tok, _ in pairs for p in (prompt, negative))
        contexts, pooled = [], []
        for text in (negative, prompt):
            parts = [reference_encode(tok, enc, text, chunks, layer=-2) for tok, enc in pairs]
            contexts.append(torch.cat([hidden for hidden, _ in parts], dim=-1))
            pooled.append(parts[1][1])
    torch.testing.assert_close(cond.context, torch.stack(contexts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.text_embeds, torch.stack(pooled), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt", ["a red circle above a blue square", LONG, "", LONG + ", " + LONG])
def test_prompt_without_syntax_is_exactly_plain(sd_pipe, sdxl_pipe, prompt):
    with torch.no_grad():
        for pipe, extra in ((sd_pipe, {}), (sdxl_pipe, {"size": (32, 32)})):
            a1111 = pipe.conditioner().encode([prompt], ["a cat"], prompt_syntax="a1111", **extra)
            plain = pipe.conditioner().encode([prompt], ["a cat"], prompt_syntax="plain", **extra)
            assert torch.equal(a1111.context, plain.context)


def test_plain_feeds_brackets_literally(sd_pipe):
    from latent_diffusion.text.encoding import encode_prompts

    with torch.no_grad():
        plain = sd_pipe.conditioner().encode(["a (red) circle"], prompt_syntax="plain").context
        literal = encode_prompts(sd_pipe.tokenizer, sd_pipe.text_encoder, ["a (red) circle"])
        a1111 = sd_pipe.conditioner().encode(["a (red) circle"], prompt_syntax="a1111").context
    assert torch.equal(plain, literal)
    assert not torch.allclose(plain, a1111)


@pytest.mark.parametrize("prompt", MALFORMED)
def test_malformed_syntax_never_raises(sd_pipe, prompt):
    with torch.no_grad():
        cond = sd_pipe.conditioner().encode([prompt], [prompt], prompt_syntax="a1111")
        ref = _sd_reference(sd_pipe, [prompt, prompt])
    torch.testing.assert_close(cond.context, ref, atol=1e-5, rtol=1e-5)


def test_pipeline_default_is_a1111_and_rejects_unknown_syntax(sd_pipe):
    call = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    weighted = sd_pipe("a (red:1.4) circle", generator=torch.Generator().manual_seed(0), **call).images
    default = sd_pipe("a (red:1.4) circle", generator=torch.Generator().manual_seed(0), prompt_syntax="a1111",
                      **call).images
    plain = sd_pipe("a (red:1.4) circle", generator=torch.Generator().manual_seed(0), prompt_syntax="plain",
                    **call).images
    assert torch.equal(weighted, default) and not torch.equal(weighted, plain)
    with pytest.raises(ValueError, match="prompt_syntax must be one of 'a1111', 'plain', got 'comfy'"):
        sd_pipe("a circle", prompt_syntax="comfy", **call)


def test_emphasis_on_zero_mean_states_keeps_the_weighted_states():
    """States averaging to 0 (a LayerNorm without bias): no division of rounding errors, no NaN."""
    from latent_diffusion.text.prompt_syntax import apply_emphasis

    torch.manual_seed(0)
    hidden = torch.nn.functional.layer_norm(torch.randn(1, 77, 32), (32,))
    weights = torch.ones(1, 1, 77)
    weights[0, 0, 3] = 1.5
    torch.testing.assert_close(apply_emphasis(hidden, weights), hidden * weights[0, 0, :, None])
    shifted = hidden + 0.5  # a real encoder's states: the mean is restored
    out = apply_emphasis(shifted, weights)
    torch.testing.assert_close(out.mean(), shifted.mean())
