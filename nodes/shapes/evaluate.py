"""Scoring generated images of the shapes domain against their prompts: the judge's verdicts and CLIP scores, and their summary.

Two scores per row: the deterministic judge (nodes.shapes.judge: what colour, shape, position and size the image shows,
compared with what its prompt asks for, read by nodes.shapes.domain.parse_caption), and a CLIP score from the toy CLIP
that the training flow saves beside the model (`clip/`). Pure functions over images and prompts; the evaluation
flow (flows.evaluate) reads and writes the datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from nodes.errors import ModelError
from nodes.shapes.judge import judge_image, score
from nodes.shapes.domain import HELD_OUT, parse_caption

ATTRIBUTES = ("colour", "shape", "position", "size")
SPLITS = ("seen", "held-out", "all")  # colour-shape combinations shown in training, never shown, and both


def judge_rows(images: list[Image.Image], prompts: list[str]) -> pd.DataFrame:
    """Per row: what the judge read (`judged_<attribute>`), whether it matches the prompt (`<attribute>_ok`,
    `all_ok`), and the prompt's `combination` ("seen" or "held-out" in training).

    A prompt outside the domain (not naming exactly one colour, shape, position and size) gets the judge's reading
    but nulls for the matches and the combination: there is nothing to compare with.
    """
    records = []
    for image, prompt in zip(images, prompts, strict=True):
        judgement = judge_image(image)
        record = {f"judged_{a}": getattr(judgement, a) for a in ATTRIBUTES}
        scene = parse_caption(prompt)
        if scene is None:
            record.update({f"{a}_ok": None for a in (*ATTRIBUTES, "all")}, combination=None)
        else:
            matches = score(judgement, scene)
            record.update({f"{a}_ok": matches[a] for a in (*ATTRIBUTES, "all")})
            record["combination"] = "held-out" if (scene.colour, scene.shape) in HELD_OUT else "seen"
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=judged_columns())
    for name in [f"{a}_ok" for a in (*ATTRIBUTES, "all")]:
        frame[name] = frame[name].astype("boolean")  # nullable: out-of-domain rows are <NA>, not False
    return frame


def judged_columns() -> list[str]:
    return [f"judged_{a}" for a in ATTRIBUTES] + [f"{a}_ok" for a in (*ATTRIBUTES, "all")] + ["combination"]


class ClipScorer:
    """CLIP score (100 x the cosine of image and prompt embeddings, at least 0, as torchmetrics' CLIPScore) from the
    toy CLIP saved in a model folder's `clip/`."""

    def __init__(self, model_dir: str | Path):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        folder = Path(model_dir) / "clip"
        if not (folder / "config.json").exists():
            raise ModelError(
                f"model {model_dir} has no clip/ folder, so it cannot give CLIP scores; use a model written by "
                "`python -m flows.train` (such as the default, sdflow:shapes)."
            )
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.size = self.model.config.vision_config.image_size

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        import torch

        if not images:
            return np.empty(0, dtype=np.float32)
        images = [im.convert("RGB") if im.size == (self.size, self.size) else
                  im.convert("RGB").resize((self.size, self.size), Image.BICUBIC) for im in images]
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        tokens = self.tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt")
        with torch.inference_mode():
            image_embeds = _embeddings(self.model.get_image_features(pixel_values=pixels))
            text_embeds = _embeddings(
                self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            )
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return (100 * cosine.clamp(min=0)).numpy().astype(np.float32)


def _embeddings(output):
    """Projected embeddings from get_*_features: a tensor (transformers 4), or an output whose pooler_output
    holds them (transformers 5)."""
    return output if hasattr(output, "norm") else output.pooler_output


def summarize(scores: pd.DataFrame) -> list[dict]:
    """Accuracy per attribute (share of in-domain rows judged correct) and mean CLIP score, for the seen and the
    held-out colour-shape combinations and for all in-domain rows; one dict per split, empty splits left out."""
    in_domain = scores[scores["combination"].notna()]
    summary = []
    for split in SPLITS:
        part = in_domain if split == "all" else in_domain[in_domain["combination"] == split]
        if part.empty:
            continue
        row = {"split": split, "rows": int(len(part))}
        row.update({a: round(float(part[f"{a}_ok"].astype(bool).mean()), 4) for a in (*ATTRIBUTES, "all")})
        if "clip_score" in part:
            row["clip_score"] = round(float(part["clip_score"].mean()), 3)
        summary.append(row)
    return summary


def held_out_pair_accuracy(scores: pd.DataFrame) -> float:
    """Share of rows on held-out colour-shape pairs whose colour and shape are both judged right (NaN if none)."""
    held = scores[scores["combination"] == "held-out"]
    return float((held["colour_ok"].astype(bool) & held["shape_ok"].astype(bool)).mean())


def summary_markdown(summary: list[dict]) -> str:
    """The summary as a markdown table, accuracies in percent."""
    if not summary:
        return "No row's prompt names one colour, shape, position and size: nothing to score.\n"
    columns = ["split", "rows", *ATTRIBUTES, "all"] + (["clip_score"] if "clip_score" in summary[0] else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        cells = [f"{100 * row[c]:.1f} %" if c in (*ATTRIBUTES, "all") else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
