"""Quality measures beyond adherence: FID, FD-CLIP and CLIP score, each where its inputs are given.

`QualityMeasures` loads what it can once (the FID Inception, a CLIP model, the reference statistics) and
scores each setting's images; what cannot be computed becomes a note in the report that says what is
missing and how to get it. See `fid.py` and `clip_score.py` for the measures themselves.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from PIL import Image


class QualityMeasures:
    """FID, FD-CLIP and CLIP score where their inputs are given; otherwise a note saying what is missing.

    `reference`: a folder of real images or an .npz of saved statistics; `clip`: a transformers CLIP folder;
    `fid_weights`: the FID Inception weights file (default: $LATENT_DIFFUSION_FID_WEIGHTS). The notes call
    `reference` and `clip` by these names, or by a front end's spellings in `names` (the CLI: its flags).
    """

    def __init__(self, reference=None, clip=None, fid_weights=None, device=None,
                 names: Optional[Mapping[str, str]] = None):
        self.reference, self.device, self.notes = reference, device, []
        self.names = {"reference": "reference", "clip": "clip", **(names or {})}
        self.fid = self._fid(fid_weights) if reference is not None else None
        self.clip_scorer, clip_embedder = self._clip(clip) if clip is not None else (None, None)
        self.fd_clip = self._reference_pair(clip_embedder) if clip_embedder is not None and reference else None
        if reference is None:
            self.notes.append(f"FID and FD-CLIP: not computed; give {self.names['reference']} DIR (real images, e.g. "
                              "`latent-diffusion shapes-export DIR --split all --size S`, or an .npz of statistics).")
        if clip is None:
            self.notes.append(f"CLIP score and FD-CLIP: not computed; give {self.names['clip']} PATH "
                              "(a transformers CLIP model folder).")

    def _reference_pair(self, extractor):
        """(extractor, (mu, sigma) of the reference), or None with a note when the reference cannot be read."""
        from latent_diffusion.evaluation.fid import measure_name, reference_statistics

        try:
            return extractor, reference_statistics(self.reference, extractor)
        except (ValueError, FileNotFoundError) as error:
            self.notes.append(f"{measure_name(extractor)}: not computed; {self.names['reference']}: {error}")
            return None

    def _fid(self, weights):
        from latent_diffusion.evaluation.inception import FIDWeightsNotFoundError, load_fid_inception

        try:
            return self._reference_pair(load_fid_inception(weights, device=self.device))
        except FIDWeightsNotFoundError as error:
            self.notes.append(f"FID: not computed. {error}")
            return None

    def _clip(self, clip):
        """(CLIPScorer or None, image embedder); a vision-only CLIP folder gives FD-CLIP but no CLIP score."""
        from latent_diffusion.evaluation.clip_score import CLIPImageEmbedder, CLIPScorer

        try:
            scorer = CLIPScorer(clip, device=self.device)
            return scorer, scorer.embedder
        except ValueError as error:
            self.notes.append(f"CLIP score: not computed; {self.names['clip']}: {error}")
            return None, CLIPImageEmbedder(clip, device=self.device)

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Optional[float]]:
        """{"fid", "fd_clip", "clip_score"}: numbers, or None where not computed."""
        return dict(fid=self._frechet(self.fid, images), fd_clip=self._frechet(self.fd_clip, images),
                    clip_score=self.clip_scorer(images, list(prompts)) if self.clip_scorer and images else None)

    def _frechet(self, pair, images) -> Optional[float]:
        from latent_diffusion.evaluation.fid import compute_fid

        if pair is None or len(images) < 2:
            return None
        extractor, statistics = pair
        return compute_fid(images, statistics, extractor=extractor)
