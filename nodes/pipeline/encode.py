"""Text encoding: prompts and negative prompts to the embeddings the U-Net attends to, through the family's text encoders.

Prompts are read as AUTOMATIC1111 reads them (nodes.pipeline.prompts): emphasis weights, BREAK, and any length, in
chunks of 75 tokens encoded one by one and concatenated along the sequence axis. A prompt of at most 75 tokens
without emphasis syntax goes through exactly the tokenizer call diffusers makes, so its image is diffusers'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
import threading
from functools import lru_cache

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.errors import PromptTableError
from nodes.pipeline.adapters import without_lora_tags
from nodes.pipeline.components import Components
from nodes.pipeline.embeddings import expand_tokens
from nodes.pipeline.family import TextEncoder
from nodes.pipeline.prompts import Chunk, chunk_input_ids, empty_chunk, has_syntax, prompt_chunks, unclosed_brackets
from nodes.params import Row

log = logging.getLogger("sdflow")


@dataclass
class PromptEmbeds:
    """Text embeddings for one batch, on the model's device and dtype (diffusers' names)."""

    prompt_embeds: torch.Tensor  # (B, 77 * chunks, D): the prompts, every text encoder's features concatenated
    negative_prompt_embeds: torch.Tensor | None  # (B, 77 * chunks, D): the negative prompts; None when no row uses guidance
    pooled_prompt_embeds: torch.Tensor | None = None  # (B, P): families whose U-Net also takes a pooled embedding
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance runs only above 1, as in diffusers."""
    return guidance_scale > 1.0


@lru_cache(maxsize=16384)
def _chunks(tokenizer, text: str) -> tuple[Chunk, ...]:
    """prompt_chunks, once per tokenizer and text: batching and encoding both ask."""
    return tuple(prompt_chunks(tokenizer, text))


def _tokenizers(components: Components) -> list:
    return [components.modules[e.tokenizer] for e in components.family.text_encoders]


def chunk_count(components: Components, row: Row) -> int:
    """How many 75-token chunks the row's embeddings have: its prompt's, or its negative prompt's if longer and
    the row uses guidance (the shorter is padded with empty chunks, as A1111 pads it)."""
    texts = [without_lora_tags(row.prompt)] + ([row.negative_prompt] if uses_guidance(row.guidance_scale) else [])
    texts = expand_tokens(texts, components.info.embeddings)  # as _encode reads them
    return max(len(_chunks(tokenizer, text)) for tokenizer in _tokenizers(components) for text in texts)


def max_clip_skip(components: Components) -> int:
    """The largest clip skip the model's text encoders allow: the layer used must be one of theirs, not the token
    embeddings. SD counts back from the last layer, SDXL from the penultimate (diffusers' clip_skip)."""
    limits = []
    for encoder in components.family.text_encoders:
        layers = components.modules[encoder.text_encoder].config.num_hidden_layers
        limits.append(layers - 1 if encoder.hidden_state is None else layers + encoder.hidden_state)
    return min(limits)


def batch_key(components: Components, row: Row) -> tuple:
    """Rows that share this key can share a batch: the same size and steps (Row.shape_key) and the same number of
    prompt chunks (embeddings of different lengths cannot be stacked). Checks the row's clip skip against the model."""
    if row.clip_skip > max_clip_skip(components):
        limit = max_clip_skip(components)
        raise PromptTableError(
            f"row {row.id!r}: clip_skip {row.clip_skip} is more than this model's text encoders allow (0 to {limit}: "
            f"0 uses the {'penultimate' if components.family.text_encoders[0].hidden_state == -2 else 'last'} layer "
            f"as the model was trained, each step one layer earlier); set the row's clip_skip, or --clip-skip, to at most {limit}."
        )
    return (row.shape_key, chunk_count(components, row))


# Tokenizers are not safe to call from two threads at once (a Rust tokenizer whose padding and truncation
# settings one call changes raises "Already borrowed" in the other); batches in lanes (batch.cpu_lanes) take turns.
_TOKENIZING = threading.Lock()


def _text_inputs(tokenizer, texts: list[str], count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each text as `count` chunks of input ids and attention masks (B * count, 77), row by row, and their emphasis
    weights (B * count, 77), None when no text is weighted.

    With one chunk, text without syntax is tokenized by the call diffusers makes (padded to 77, truncated).
    """
    with _TOKENIZING:
        return _tokenized(tokenizer, texts, count)


def _tokenized(tokenizer, texts: list[str], count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    length = tokenizer.model_max_length
    ids, masks, weights = [], [], []
    plain = [i for i, t in enumerate(texts) if count == 1 and not has_syntax(t)]
    if plain:
        tokens = tokenizer([texts[i] for i in plain], padding="max_length", max_length=length, truncation=True)
        plain = dict(zip(plain, zip(tokens.input_ids, tokens.attention_mask)))
    for i, text in enumerate(texts):
        if i in plain:
            ids.append(plain[i][0])
            masks.append(plain[i][1])
            weights.append([1.0] * length)
            continue
        chunks = list(_chunks(tokenizer, text))
        for chunk in chunks + [empty_chunk()] * (count - len(chunks)):
            chunk_ids, chunk_mask = chunk_input_ids(tokenizer, chunk)
            ids.append(chunk_ids)
            masks.append(chunk_mask)
            weights.append([1.0, *chunk.weights] + [1.0] * (length - 1 - len(chunk.weights)))
    weighted = any(w != 1.0 for row in weights for w in row)
    return torch.tensor(ids), torch.tensor(masks), torch.tensor(weights) if weighted else None


def emphasize(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis ("Original"): each token's embedding (N, 77, D) times its weight (N, 77), then each chunk
    rescaled so that its mean is the unweighted one. Chunks whose weights are all 1 are left untouched.

    A1111 takes the mean over its whole batch; here it is each chunk's own, so a row's image does not depend on its
    batch (the same as A1111 at batch size 1). Computed in float32.
    """
    weighted = (weights != 1.0).any(dim=1)
    if not weighted.any():
        return embeds
    z = embeds[weighted].float()
    original = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[weighted].to(z.device, torch.float32).unsqueeze(-1)
    z = z * (original / z.mean(dim=(1, 2), keepdim=True))
    out = embeds.clone()
    out[weighted] = z.to(embeds.dtype)
    return out


def _layer(encoder: TextEncoder, text_encoder, output, clip_skip: int) -> torch.Tensor:
    """The hidden state that conditions the U-Net, `clip_skip` layers before the family's own, as diffusers' clip_skip
    picks it: SD's last hidden state, or with clip skip an earlier one through the final layer norm; SDXL's
    penultimate, or one `clip_skip` layers before it (no layer norm)."""
    if encoder.hidden_state is None:
        if clip_skip == 0:
            return output[0]
        # transformers 5.6 flattened CLIPTextModel (no `text_model` wrapper), where diffusers 0.42 still looks for
        # it and fails (huggingface/diffusers#14124): the layer norm is the model's own, or its wrapper's.
        text_model = getattr(text_encoder, "text_model", text_encoder)
        return text_model.final_layer_norm(output.hidden_states[-(clip_skip + 1)])
    return output.hidden_states[encoder.hidden_state - clip_skip]


def _encode(
    components: Components, encoder: TextEncoder, texts: list[str], count: int, clip_skips: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text encoder's embeddings (B, 77 * count, D) of `texts`, and its pooled output of each text's first chunk
    where the family uses it (A1111 pools the first chunk too)."""
    tokenizer, text_encoder = components.modules[encoder.tokenizer], components.modules[encoder.text_encoder]
    texts = expand_tokens(texts, components.info.embeddings)  # a multi-vector embedding's token: all its vectors
    ids, attention, weights = _text_inputs(tokenizer, texts, count)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = attention.to(components.device)
    skips = [s for s in clip_skips for _ in range(count)]  # one per chunk
    hidden = encoder.hidden_state is not None or any(skips)
    output = text_encoder(ids.to(components.device), attention_mask=mask, output_hidden_states=hidden)
    layers = {s: _layer(encoder, text_encoder, output, s) for s in set(skips)}
    if len(layers) == 1:
        embeds = layers[skips[0]]
    else:  # rows of different clip skips: each chunk its own row's layer
        embeds = torch.stack([layers[s][i] for i, s in enumerate(skips)])
    if weights is not None:
        embeds = emphasize(embeds, weights)
    embeds = embeds.reshape(len(texts), count * embeds.shape[1], embeds.shape[2])
    pooled = output[0].reshape(len(texts), count, -1)[:, 0] if encoder.pooled else None
    return embeds.to(dtype=components.dtype), None if pooled is None else pooled.to(dtype=components.dtype)


def _encode_all(components: Components, texts: list[str], count: int, clip_skips: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`texts` through each of the family's text encoders: features concatenated, the pooled output if any."""
    outputs = [_encode(components, encoder, texts, count, clip_skips) for encoder in components.family.text_encoders]
    embeds = outputs[0][0] if len(outputs) == 1 else torch.cat([e for e, _ in outputs], dim=-1)
    pooled = next((p for _, p in outputs if p is not None), None)
    return embeds, pooled


def warn_unclosed(rows: list[Row]) -> None:
    """A warning naming the row for each prompt or negative prompt with a bracket never closed: A1111 weights the
    rest of the text by it, which a pasted prompt rarely means."""
    for r in rows:
        for which in ("prompt", "negative_prompt"):
            text = getattr(r, which)
            if has_syntax(text) and (n := unclosed_brackets(text)):
                log.warning(
                    "row %r: %s has %d unclosed bracket(s), which weight the rest of it, as in AUTOMATIC1111; "
                    "close them, or write \\( and \\[ for the characters", r.id, which.replace("_", " "), n,
                )


@torch.inference_mode()
def encode_prompts(components: Components, rows: list[Row]) -> PromptEmbeds:
    """Encode a batch's prompts and, where any row uses guidance, its negative prompts ("" if none).

    The rows share a chunk count (batch_key); a row's shorter text is padded to it with empty chunks. Each row's
    clip skip picks the encoders' layer (diffusers' clip_skip), for its prompt and its negative prompt alike.
    """
    counts = {chunk_count(components, r) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"rows of different prompt chunk counts {sorted(counts)} in one batch (see batch_key)")
    count, skips = counts.pop(), [r.clip_skip for r in rows]
    warn_unclosed(rows)
    embeds, pooled = _encode_all(components, [without_lora_tags(r.prompt) for r in rows], count, skips)
    negative = negative_pooled = None
    if any(uses_guidance(r.guidance_scale) for r in rows):
        # Rows without guidance never use theirs: "" stands in, so that it cannot lengthen the batch's chunks.
        texts = [r.negative_prompt if uses_guidance(r.guidance_scale) else "" for r in rows]
        negative, negative_pooled = _encode_all(components, texts, count, skips)
        if components.info.force_zeros_for_empty_prompt:
            # As SDXL pipelines do when no negative prompt is given: zeros, not the encoding of "".
            empty = torch.tensor([r.negative_prompt == "" for r in rows], device=negative.device)
            negative = torch.where(empty.view(-1, 1, 1), torch.zeros_like(negative), negative)
            if negative_pooled is not None:
                negative_pooled = torch.where(empty.view(-1, 1), torch.zeros_like(negative_pooled), negative_pooled)
    return PromptEmbeds(embeds, negative, pooled, negative_pooled)


encode_prompts_task = task(encode_prompts, name="encode-prompts", cache_policy=NO_CACHE, persist_result=False)
