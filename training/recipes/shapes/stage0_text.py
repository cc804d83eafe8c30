"""Stage 0 of the Shapes recipe: a tokenizer and a small CLIP text encoder, trained contrastively on Shapes.

    python training/recipes/shapes/stage0_text.py --output_dir /work/runs/shapes/stage0

1. A CLIP-format BPE tokenizer (`latent_diffusion.text.tokenizers.train_clip_tokenizer`)
   is trained on Shapes training captions, full and with optional parts
   dropped, plus one line of every lower-case letter, digit and punctuation
   mark so that prompts outside the Shapes world never hit the unknown token.
2. A small transformers `CLIPModel` (text tower and a ViT on 32 px images,
   patch 8) is trained with the symmetric InfoNCE loss and a learnable
   temperature on (image, caption) pairs streamed from the Shapes generator.
   Each image also meets a *hard negative*: its caption with one thing
   changed (a colour, a shape, the position, the size, the background, the
   relation or the order of the two objects). Random batches almost never
   hold such near-misses, and without them a text encoder can pass the
   contrastive test while mixing up which colour goes with which shape,
   the very thing the denoiser later needs from it. Captions that state a
   position or relation get a spatial hard negative (that phrase changed)
   with probability `--spatial_negative_share`.
   A second loss reads every caption token back from its last hidden state
   through the tied token embeddings (`--token_identity_weight`): the
   denoiser cross-attends to the per-token states, and contrastive training
   alone let the first layer wash "left"/"right"/"above"/"below" into the
   caption's colours, so the denoiser never saw them. A third loss binds
   relations (`--relation_binding_weight`): in a two-object caption the
   relation word's state must name the first object and every state after it
   the side the second object is on, so that the denoiser can tell which
   object goes where (the causal encoder otherwise wrote the relation into
   that one word's state and nowhere else).
3. The text tower is saved as `text_encoder/` (`CLIPTextModel`) next to
   `tokenizer/`, and caption->image retrieval is measured on images of
   seeds never trained on: top-1 among `--retrieval_candidates` images, with
   full and with training-style captions, plus the share of images that
   score their own caption above its hard negative, and the accuracy of the
   relation-binding readouts.

Checkpoints and resuming: `common.train_stage` (OUTPUT_DIR/checkpoints).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import string
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from latent_diffusion.text.encoding import tokenize_prompts
from latent_diffusion.shapes import (
    BACKGROUNDS,
    HELD_OUT_PAIRS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_CLASSES,
    caption,
    format_prompt,
    full_caption,
    parse_prompt,
    sample_scene,
)
from latent_diffusion.text.tokenizers import train_clip_tokenizer
from latent_diffusion.training.recipes.shapes.common import (
    add_loop_arguments,
    shapes_batch,
    stage_output_dir,
    train_stage,
    write_json,
)

EXTRA_CHARACTERS = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
OPPOSITE_RELATION = {"above": "below", "below": "above", "to the left of": "to the right of",
                     "to the right of": "to the left of"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(p, seed=0, train_batch_size=128, max_train_steps=3500, learning_rate=5e-4,
                       adam_weight_decay=0.05)
    p.add_argument("--eval_seed", type=int, default=1_000_003, help="seed of the retrieval test images (never trained on)")
    p.add_argument("--resolution", type=int, default=32,
                   help="image side of the vision tower (32 px keeps every attribute visible, at ~40%% of the cost of 64)")
    # tokenizer
    p.add_argument("--tokenizer_corpus_size", type=int, default=50_000, help="scenes whose captions train the BPE")
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--model_max_length", type=int, default=32)
    # model
    p.add_argument("--text_hidden_size", type=int, default=128)
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--text_heads", type=int, default=4)
    p.add_argument("--vision_hidden_size", type=int, default=128)
    p.add_argument("--vision_layers", type=int, default=4)
    p.add_argument("--vision_heads", type=int, default=4)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--projection_dim", type=int, default=128)
    # losses
    p.add_argument("--hard_negatives", type=int, default=1, choices=(0, 1), help="add one hard-negative caption per image")
    p.add_argument("--spatial_negative_share", type=float, default=0.8,
                   help="chance that a caption with a position or relation gets a spatial hard negative (position or "
                        "relation changed) rather than one drawn uniformly over all edit kinds")
    p.add_argument("--token_identity_weight", type=float, default=1.0,
                   help="weight of the loss that keeps each token readable from its last hidden state (0: off)")
    p.add_argument("--relation_binding_weight", type=float, default=1.0,
                   help="weight of the loss that makes a two-object caption's states say which object goes where (0: off)")
    # evaluation
    p.add_argument("--retrieval_candidates", type=int, default=100)
    p.add_argument("--retrieval_groups", type=int, default=10)
    return p.parse_args(argv)


# ---------------------------------------------------------------- tokenizer


def caption_corpus(num_scenes: int, seed: int) -> list[str]:
    """Full and dropped training captions of `num_scenes` train-split scenes, and one line of extra characters."""
    rng = np.random.default_rng((seed, 17))
    corpus = [EXTRA_CHARACTERS]
    for _ in range(num_scenes):
        scene = sample_scene(rng, "train")
        corpus += [full_caption(scene), caption(scene, rng)]
    return corpus


def build_tokenizer(args, folder: Path):
    """Train the tokenizer (or load it when a previous run saved it) and check every Shapes caption fits its window."""
    from transformers import CLIPTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    corpus = caption_corpus(args.tokenizer_corpus_size, args.seed)
    tokenizer = train_clip_tokenizer(corpus, vocab_size=args.vocab_size, model_max_length=args.model_max_length)
    longest = max(len(ids) for ids in tokenizer(corpus[1:], add_special_tokens=True).input_ids)
    if longest > args.model_max_length:
        raise ValueError(f"--model_max_length {args.model_max_length} is shorter than the longest caption ({longest} tokens)")
    tokenizer.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------- hard negatives


def _allowed(colour: str, shape: str) -> bool:
    return (colour, shape) not in HELD_OUT_PAIRS


SPATIAL_EDITS = ("position", "relation")  # the edits only an encoder that reads positions can tell apart


def edit_kind(kind: str) -> str:
    """The family of an edit, without the object index ("colour0" -> "colour")."""
    return kind.rstrip("01")


def hard_negative(text: str, rng: np.random.Generator, spatial_share: float = 0.0) -> str:
    """The caption with one stated thing changed, so that it is false of the image it describes."""
    return hard_negative_with_kind(text, rng, spatial_share)[1]


def hard_negative_with_kind(text: str, rng: np.random.Generator, spatial_share: float = 0.0) -> tuple[str, str]:
    """(edit family, caption with one stated thing changed): a hard negative and what kind of edit made it.

    Never introduces a held-out colour-shape pair, and keeps two objects different.
    With probability `spatial_share` a caption that states a position or a
    relation gets that changed: drawn uniformly over all kinds, a position
    edit is one in five, and without enough of them a contrastive text
    encoder learns to ignore where things are (the first shipped model's
    did: "on the left" and "on the right" encoded 99.9% alike).
    """
    spec = parse_prompt(text)
    objects = list(spec.objects)
    edits: dict[str, list] = {}  # kind of edit -> the captions it can make; a kind is drawn first, then a caption

    def replaced(i: int, **change) -> str:
        new = list(objects)
        new[i] = dataclasses.replace(objects[i], **change)
        return format_prompt(dataclasses.replace(spec, objects=tuple(new)))

    for i, obj in enumerate(objects):
        taken = {(o.colour, o.shape) for j, o in enumerate(objects) if j != i}
        edits[f"colour{i}"] = [replaced(i, colour=c) for c in OBJECT_COLOURS
                               if c != obj.colour and _allowed(c, obj.shape) and (c, obj.shape) not in taken]
        edits[f"shape{i}"] = [replaced(i, shape=s) for s in SHAPES
                              if s != obj.shape and _allowed(obj.colour, s) and (obj.colour, s) not in taken]
        if obj.size is not None:
            edits[f"size{i}"] = [replaced(i, size=s) for s in SIZE_CLASSES if s != obj.size]
    if spec.position is not None:
        edits["position"] = [format_prompt(dataclasses.replace(spec, position=p)) for p in POSITIONS if p != spec.position]
    if spec.background is not None:
        edits["background"] = [format_prompt(dataclasses.replace(spec, background=b))
                               for b in BACKGROUNDS if b != spec.background]
    if spec.relation is not None:
        edits["relation"] = [format_prompt(dataclasses.replace(spec, relation=OPPOSITE_RELATION[spec.relation]))]
        a, b = objects
        if a.colour != b.colour and _allowed(b.colour, a.shape) and _allowed(a.colour, b.shape):
            swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
            edits["swap_colours"] = [format_prompt(dataclasses.replace(spec, objects=swapped))]
    kinds = sorted(kind for kind, options in edits.items() if options)
    spatial = [kind for kind in kinds if kind in SPATIAL_EDITS]
    if spatial and spatial_share > 0 and rng.random() < spatial_share:  # share 0 draws as before
        kinds = spatial
    kind = kinds[int(rng.integers(len(kinds)))]
    options = edits[kind]
    return edit_kind(kind), options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- model


def tower(width: int, layers: int, heads: int, projection_dim: int) -> dict:
    """The size of one CLIP tower (text or vision): transformer width, depth and heads, MLP 4× the width."""
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=projection_dim)


def build_clip(args, tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **tower(args.text_hidden_size, args.text_layers, args.text_heads, args.projection_dim),
        max_position_embeddings=args.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        **tower(args.vision_hidden_size, args.vision_layers, args.vision_heads, args.projection_dim),
        image_size=args.resolution,
        patch_size=args.patch_size,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=args.projection_dim)
    torch.manual_seed(args.seed)
    return CLIPModel(config)


def encode_texts(model, tokenizer, texts: Sequence[str]):
    """(token ids (N, L), text-tower output) of `texts`, tokenised exactly as the pipeline tokenises prompts."""
    ids = tokenize_prompts(tokenizer, texts, num_chunks=1)[:, 0]  # (N, L)
    return ids, model.text_model(input_ids=ids)


def project_text(model, output) -> torch.Tensor:
    """(N, P) unit-norm projected text embeddings from the text tower's pooled output."""
    return F.normalize(model.text_projection(output.pooler_output), dim=-1)


def text_embeddings(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(N, P) unit-norm projected text embeddings."""
    return project_text(model, encode_texts(model, tokenizer, texts)[1])


def token_identity_loss(model, ids: torch.Tensor, states: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Cross-entropy of reading every token back from its last hidden state, through the tied token embeddings.

    The denoiser cross-attends to these per-token states, not to the pooled
    one. Contrastive training alone lets the first layer wash rare words into
    the caption's colours ("left" and "right" kept 8% of their difference), so the
    denoiser could not see them; this keeps each token's identity in its
    state. Tokens after the first end-of-text (padding) are not scored.
    """
    logits = states @ model.text_model.embeddings.token_embedding.weight.T  # (N, L, V)
    first_eos = (ids == eos_token_id).int().argmax(dim=1, keepdim=True)  # (N, 1)
    keep = torch.arange(ids.shape[1]).unsqueeze(0) <= first_eos  # (N, L)
    return F.cross_entropy(logits[keep], ids[keep])


SIDE_WORDS = ("above", "below", "left", "right")  # the word that names each relation's side


def side_word(relation: str) -> str:
    """The SIDE_WORDS word of a relation phrase ("to the left of" -> "left")."""
    return next(word for word in relation.split() if word in SIDE_WORDS)


@dataclasses.dataclass(frozen=True)
class BindingVocab:
    """Token ids of the words the relation-binding readouts choose among."""

    sides: torch.Tensor  # (4,) SIDE_WORDS
    colours: torch.Tensor  # (6,) OBJECT_COLOURS
    shapes: torch.Tensor  # (3,) SHAPES


@functools.lru_cache(maxsize=4)  # called every training step; a tokenizer hashes by identity
def binding_vocab(tokenizer) -> BindingVocab:
    """The single-token ids of the side, colour and shape words (an error if the tokenizer splits one)."""
    def ids(words):
        out = []
        for word in words:
            pieces = tokenizer(word, add_special_tokens=False).input_ids
            if len(pieces) != 1:
                raise ValueError(f"the tokenizer splits {word!r} into {len(pieces)} tokens; relation binding needs one")
            out.append(pieces[0])
        return torch.tensor(out)
    return BindingVocab(ids(SIDE_WORDS), ids(OBJECT_COLOURS), ids(SHAPES))


def binding_targets(ids: torch.Tensor, captions: Sequence[str], vocab: BindingVocab) -> Optional[dict]:
    """Where and what the binding readouts score, for the captions that relate two objects (None if none does).

    rows, relation: (K,) caption row and position of its relation word;
    side: (K,) index in SIDE_WORDS of the second object's side; colour, shape:
    (K,) indices of the first object's colour and shape.
    """
    rows, relation, side, colour, shape = [], [], [], [], []
    for row, text in enumerate(captions):
        spec = parse_prompt(text)
        if spec.relation is None:
            continue
        positions = torch.isin(ids[row], vocab.sides).nonzero().flatten()
        first = spec.objects[0]
        rows.append(row)
        relation.append(int(positions[0]))  # two-object captions state no position, so this is the relation word
        side.append(SIDE_WORDS.index(side_word(OPPOSITE_RELATION[spec.relation])))  # the second object's side
        colour.append(OBJECT_COLOURS.index(first.colour))
        shape.append(SHAPES.index(first.shape))
    if not rows:
        return None
    return {k: torch.tensor(v) for k, v in
            dict(rows=rows, relation=relation, side=side, colour=colour, shape=shape).items()}


def binding_logits(model, states: torch.Tensor, vocab: BindingVocab, targets: dict) -> dict[str, tuple]:
    """(logits, target) of each binding readout, through the tied token embeddings restricted to its words.

    side: every state after the relation word (the second object, the end
    and padding states) reads the side the second object is on; colour and
    shape: the relation word's state reads the first object. Restricted to
    those few words, the readouts do not compete with the token-identity
    loss, which wants each state to read back its own token over the whole
    vocabulary.
    """
    table = model.text_model.embeddings.token_embedding.weight
    rows, relation = targets["rows"], targets["relation"]
    after = torch.arange(states.shape[1]).unsqueeze(0) > relation.unsqueeze(1)  # (K, L)
    tail = states[rows][after]  # (T, D)
    side_target = targets["side"].unsqueeze(1).expand_as(after)[after]
    at_relation = states[rows, relation]  # (K, D)
    return {
        "side": (tail @ table[vocab.sides].T, side_target),
        "colour": (at_relation @ table[vocab.colours].T, targets["colour"]),
        "shape": (at_relation @ table[vocab.shapes].T, targets["shape"]),
    }


def relation_binding_loss(model, ids: torch.Tensor, states: torch.Tensor, captions: Sequence[str],
                          vocab: BindingVocab) -> torch.Tensor:
    """Make a two-object caption's states say which object goes where.

    The encoder is causal: in "a red circle above a blue square" the first
    object's tokens come before the relation and cannot know it, and without
    this loss the states after the relation word differed by only 3-6% from
    those of "... below ...", so the denoiser could not tell which object goes
    on top (two-object adherence stayed at chance, 0.39, over three rounds).
    With it, the relation word's state names the first object and every state
    after it names the second object's side.
    """
    targets = binding_targets(ids, captions, vocab)
    if targets is None:
        return states.new_zeros(())
    scored = binding_logits(model, states, vocab, targets)
    side = F.cross_entropy(*scored["side"])
    return side + (F.cross_entropy(*scored["colour"]) + F.cross_entropy(*scored["shape"])) / 2


def image_embeddings(model, pixels: torch.Tensor) -> torch.Tensor:
    """(N, P) unit-norm projected image embeddings of (N, 3, S, S) pixels in [-1, 1]."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output  # (N, D)
    return F.normalize(model.visual_projection(pooled), dim=-1)


def contrastive_loss(model, tokenizer, pixels, captions, negatives: Optional[list[str]],
                     identity_weight: float = 0.0, binding_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE; image->text also ranks each image's hard negative caption; plus `identity_weight` times
    the token-identity loss and `binding_weight` times the relation-binding loss of the captions.
    Returns (loss, batch accuracy)."""
    batch = pixels.shape[0]
    texts = list(captions) + (list(negatives) if negatives else [])
    ids, output = encode_texts(model, tokenizer, texts)
    t = project_text(model, output)  # (B or 2B, P)
    v = image_embeddings(model, pixels)  # (B, P)
    scale = model.logit_scale.exp().clamp(max=100.0)
    logits = scale * v @ t.T  # (B, B or 2B)
    target = torch.arange(batch)
    loss_image = F.cross_entropy(logits, target)
    loss_text = F.cross_entropy(logits[:, :batch].T, target)
    accuracy = (logits[:, :batch].argmax(dim=1) == target).float().mean().item()
    loss = (loss_image + loss_text) / 2
    states = output.last_hidden_state[:batch]
    if identity_weight:
        loss = loss + identity_weight * token_identity_loss(model, ids[:batch], states, tokenizer.eos_token_id)
    if binding_weight:
        vocab = binding_vocab(tokenizer)
        loss = loss + binding_weight * relation_binding_loss(model, ids[:batch], states, captions, vocab)
    return loss, accuracy


# ---------------------------------------------------------------- evaluation


def binding_correct(model, tokenizer, captions: Sequence[str]) -> dict[str, list[float]]:
    """Per readout of `binding_logits` (side, colour, shape), whether each scored state reads the right word."""
    ids, output = encode_texts(model, tokenizer, captions)
    vocab = binding_vocab(tokenizer)
    targets = binding_targets(ids, captions, vocab)
    if targets is None:
        return {}
    scored = binding_logits(model, output.last_hidden_state, vocab, targets)
    return {name: (logits.argmax(dim=1) == target).float().tolist() for name, (logits, target) in scored.items()}


@torch.no_grad()
def evaluate(model, tokenizer, args, split: str = "train") -> dict:
    """Caption->image top-1 retrieval among `retrieval_candidates` unseen images, and hard-negative accuracy."""
    model.eval()
    top1_full, top1_train = [], []
    by_kind: dict[str, list[float]] = {}
    binding: dict[str, list[float]] = {}
    for group in range(args.retrieval_groups):
        data = shapes_batch(args.eval_seed, group, args.retrieval_candidates, args.resolution, split)
        for name, right in binding_correct(model, tokenizer, data.full_captions).items():
            binding.setdefault(name, []).extend(right)
        v = image_embeddings(model, data.pixels)
        rng = np.random.default_rng((args.eval_seed, group, 1))
        kinds, negatives = zip(*(hard_negative_with_kind(c, rng) for c in data.full_captions))
        target = torch.arange(len(data.captions))
        full = text_embeddings(model, tokenizer, data.full_captions)  # (N, P), for retrieval and hard negatives
        for t, out in ((full, top1_full), (text_embeddings(model, tokenizer, data.captions), top1_train)):
            out.append(((t @ v.T).argmax(dim=1) == target).float().mean().item())  # (N texts, N images)
        right = (full * v).sum(-1) > (text_embeddings(model, tokenizer, negatives) * v).sum(-1)
        for kind, r in zip(kinds, right.tolist()):
            by_kind.setdefault(kind, []).append(float(r))
    model.train()
    return {
        "retrieval_top1_full_captions": float(np.mean(top1_full)),
        "retrieval_top1_training_captions": float(np.mean(top1_train)),
        "hard_negative_accuracy": float(np.mean([r for rs in by_kind.values() for r in rs])),
        "hard_negative_accuracy_by_edit": {kind: float(np.mean(rs)) for kind, rs in sorted(by_kind.items())},
        "relation_binding_accuracy": {name: float(np.mean(rs)) for name, rs in sorted(binding.items())},
        "candidates": args.retrieval_candidates,
        "queries": args.retrieval_groups * args.retrieval_candidates,
        "split": split,
    }


def export_text_encoder(model, tokenizer, output_dir: Path) -> None:
    """Save the text tower as a standalone `CLIPTextModel` under output_dir/text_encoder."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(model.config.text_config)
    text_encoder.load_state_dict(model.text_model.state_dict())
    text_encoder.save_pretrained(str(output_dir / "text_encoder"), safe_serialization=True)


# ---------------------------------------------------------------- main


def contrastive_step(args, model, tokenizer):
    """The stage's loss on batch `step`: contrastive with hard negatives, token identity, relation binding."""
    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        data = shapes_batch(args.seed, step, args.train_batch_size, args.resolution)
        negatives = None
        if args.hard_negatives:
            rng = np.random.default_rng((args.seed, step, 3))
            negatives = [hard_negative(c, rng, args.spatial_negative_share) for c in data.captions]
        loss, accuracy = contrastive_loss(model, tokenizer, data.pixels, data.captions, negatives,
                                          args.token_identity_weight, args.relation_binding_weight)
        return loss, {"loss": loss.item(), "acc": accuracy, "T": model.logit_scale.exp().item()}
    return step_loss


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Train (resuming), export and measure; returns the metrics, or None when paused before the last step."""
    args = parse_args(argv)
    output_dir = stage_output_dir(args)
    tokenizer = build_tokenizer(args, output_dir / "tokenizer")
    model = build_clip(args, tokenizer)
    trained = train_stage(args, model, contrastive_step(args, model, tokenizer), desc="stage 0 CLIP")
    if not trained.finished:  # paused by --stop_after_steps
        return None
    export_text_encoder(model, tokenizer, output_dir)
    metrics = {
        "stage": "text",
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "compute_s": trained.compute_s,
        "parameters_text": sum(p.numel() for p in model.text_model.parameters()),
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "model_max_length": tokenizer.model_max_length,
        "eval": evaluate(model, tokenizer, args),
        "eval_heldout_pairs": evaluate(model, tokenizer, args, split="heldout"),
        "args": vars(args),
    }
    write_json(output_dir / "metrics.json", metrics)
    print(metrics["eval"], metrics["eval_heldout_pairs"], flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
