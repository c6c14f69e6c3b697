"""CLIP text encoding: prompts and negative prompts to the embeddings the U-Net attends to."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.models import Components
from nodes.params import Row

log = logging.getLogger("sdflow")


@dataclass
class PromptEmbeddings:
    """Text embeddings for one batch, on the model's device and dtype."""

    cond: torch.Tensor  # (B, 77, D): the prompts
    uncond: torch.Tensor | None  # (B, 77, D): the negative prompts; None when no row uses guidance


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance runs only above 1, as in diffusers."""
    return guidance_scale > 1.0


def _encode(components: Components, texts: list[str]) -> torch.Tensor:
    tokenizer = components.tokenizer
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = None
    if getattr(components.text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(components.device)
    embeds = components.text_encoder(tokens.input_ids.to(components.device), attention_mask=mask)[0]
    return embeds.to(dtype=components.dtype)


def truncated_rows(components: Components, rows: list[Row]) -> list[tuple[int | str, str]]:
    """(row id, which text) for each prompt or negative prompt longer than the tokenizer's limit."""
    tokenizer = components.tokenizer
    found = []
    for which in ("prompt", "negative_prompt"):
        texts = [getattr(r, which) for r in rows]
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False).input_ids]
        found += [(r.id, which) for r, n in zip(rows, lengths) if n > tokenizer.model_max_length]
    return found


@torch.inference_mode()
def encode_prompts(components: Components, rows: list[Row]) -> PromptEmbeddings:
    """Encode a batch's prompts and, where any row uses guidance, its negative prompts ("" if none).

    Prompts over the tokenizer's limit (77 tokens for CLIP) are truncated, as diffusers does, with a
    warning that names the row.
    """
    for row_id, which in truncated_rows(components, rows):
        log.warning(
            "row %r: %s is longer than %d tokens and was truncated",
            row_id,
            which.replace("_", " "),
            components.tokenizer.model_max_length,
        )
    cond = _encode(components, [r.prompt for r in rows])
    uncond = None
    if any(uses_guidance(r.guidance_scale) for r in rows):
        uncond = _encode(components, [r.negative_prompt for r in rows])
    return PromptEmbeddings(cond=cond, uncond=uncond)


encode_prompts_task = task(encode_prompts, name="encode-prompts", cache_policy=NO_CACHE, persist_result=False)
