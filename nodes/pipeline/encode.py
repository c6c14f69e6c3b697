"""Text encoding: prompts and negative prompts to the embeddings the U-Net attends to, through the family's text encoders."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.pipeline.adapters import without_lora_tags
from nodes.pipeline.components import Components
from nodes.pipeline.family import TextEncoder
from nodes.params import Row

log = logging.getLogger("sdflow")


@dataclass
class PromptEmbeds:
    """Text embeddings for one batch, on the model's device and dtype (diffusers' names)."""

    prompt_embeds: torch.Tensor  # (B, 77, D): the prompts, every text encoder's features concatenated
    negative_prompt_embeds: torch.Tensor | None  # (B, 77, D): the negative prompts; None when no row uses guidance
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P): families whose U-Net also takes a pooled embedding
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance runs only above 1, as in diffusers."""
    return guidance_scale > 1.0


def _encode(components: Components, encoder: TextEncoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text encoder's embeddings (B, 77, D) of `texts`, and its pooled output where the family uses it."""
    tokenizer, text_encoder = components.modules[encoder.tokenizer], components.modules[encoder.text_encoder]
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(components.device)
    hidden = encoder.hidden_state is not None
    output = text_encoder(tokens.input_ids.to(components.device), attention_mask=mask, output_hidden_states=hidden)
    embeds = output.hidden_states[encoder.hidden_state] if hidden else output[0]
    pooled = output[0] if encoder.pooled else None
    return embeds.to(dtype=components.dtype), None if pooled is None else pooled.to(dtype=components.dtype)


def _encode_all(components: Components, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`texts` through each of the family's text encoders: features concatenated, the pooled output if any."""
    outputs = [_encode(components, encoder, texts) for encoder in components.family.text_encoders]
    embeds = outputs[0][0] if len(outputs) == 1 else torch.cat([e for e, _ in outputs], dim=-1)
    pooled = next((p for _, p in outputs if p is not None), None)
    return embeds, pooled


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
def encode_prompts(components: Components, rows: list[Row]) -> PromptEmbeds:
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
    embeds, pooled = _encode_all(components, [without_lora_tags(r.prompt) for r in rows])
    negative = negative_pooled = None
    if any(uses_guidance(r.guidance_scale) for r in rows):
        negative, negative_pooled = _encode_all(components, [r.negative_prompt for r in rows])
        if components.info.force_zeros_for_empty_prompt:
            # As SDXL pipelines do when no negative prompt is given: zeros, not the encoding of "".
            empty = torch.tensor([r.negative_prompt == "" for r in rows], device=negative.device)
            negative = torch.where(empty.view(-1, 1, 1), torch.zeros_like(negative), negative)
            if negative_pooled is not None:
                negative_pooled = torch.where(empty.view(-1, 1), torch.zeros_like(negative_pooled), negative_pooled)
    return PromptEmbeds(embeds, negative, pooled, negative_pooled)


encode_prompts_task = task(encode_prompts, name="encode-prompts", cache_policy=NO_CACHE, persist_result=False)
