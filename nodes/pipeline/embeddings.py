"""Textual inversion: embedding files read and checked before any weight loads, then added to the model's tokenizers
and text encoders with diffusers' own `load_textual_inversion`.

The formats people hold: AUTOMATIC1111's `.pt` (`string_to_param`) and `.safetensors` (`emb_params`), diffusers'
`learned_embeds.safetensors` (`{token: tensor}`), and SDXL embeddings with `clip_l` and `clip_g` tensors, one per
text encoder. An embedding is run-wide, so it is part of the model's identity: `with_embeddings` extends the model's
fingerprint by each file's content and token, and the process's components cache, keyed by fingerprint, loads a
fresh model for a run with embeddings (loading them mutates the tokenizer and text encoder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nodes.errors import ModelError
from nodes.pipeline.family import FAMILIES, ModelFamily

if TYPE_CHECKING:
    from nodes.pipeline.components import ModelInfo

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's tensors, in the order of the family's text encoders


class EmbeddingError(ModelError):
    """An embedding file that cannot be used with this model: missing, unreadable, of another model, a clashing token."""


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding as the run uses it."""

    path: str  # the file as given
    token: str  # the word prompts use: as given after the path, else the file's stem (A1111's convention)
    sha256: str  # of the file's bytes; its first 12 hex digits are A1111's short hash (infotext `TI hashes`)
    vectors: tuple[torch.Tensor, ...] = field(compare=False, repr=False)  # (n, dim) per text encoder of the family

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def record(self) -> dict:
        """The manifest's record of it."""
        return {"path": self.path, "token": self.token, "sha256": self.sha256, "vectors": int(self.vectors[0].shape[0])}


def parse_spec(spec: str) -> tuple[str, str]:
    """`PATH[:TOKEN]` as (path, token); the token defaults to the file's name without its extension."""
    path, sep, token = spec.rpartition(":")
    if not sep or not path or os.path.exists(spec) or any(c in token for c in "/\\"):
        path, token = spec, Path(spec).stem
    if not token.strip() or token != token.strip():
        raise EmbeddingError(f"--embedding {spec}: its token {token!r} is empty or has outer spaces; write PATH:TOKEN.")
    return path, token


def read_state_dict(path: str, allow_pickle: bool) -> dict:
    """The file's tensors: safetensors always; pickle files (.pt, .bin) only with `allow_pickle`, read as diffusers reads them."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EmbeddingError(f"--embedding {path}: no such file.")
    if file.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise EmbeddingError(
            f"--embedding {path} is a pickle file, which can run code when loaded; convert it to .safetensors, "
            "or pass --allow-pickle to load it."
        )
    from diffusers.models.model_loading_utils import load_state_dict

    try:
        state = load_state_dict(str(file))
    except Exception as e:  # damaged, truncated, or not a tensor file at all
        raise EmbeddingError(f"--embedding {path} cannot be read as an embedding file ({type(e).__name__}: {e}).") from None
    if not isinstance(state, dict):
        raise EmbeddingError(f"--embedding {path} holds a {type(state).__name__}, not an embedding's tensors.")
    return state


def embedding_vectors(state: dict, family: ModelFamily, path: str) -> tuple[torch.Tensor, ...]:
    """The (n, dim) vectors for each of the family's text encoders, from any of the formats (module docstring)."""
    encoders = len(family.text_encoders)
    if all(k in state for k in SDXL_KEYS):
        if encoders != 2:
            raise EmbeddingError(
                f"--embedding {path} is an SDXL embedding (clip_l and clip_g), but the model is {family.title}, whose "
                "one text encoder it was not made for; use an embedding trained for this model."
            )
        tensors = [state[k] for k in SDXL_KEYS]
    elif "string_to_param" in state:  # A1111 .pt (and the original textual-inversion code's)
        tensors = [state["string_to_param"]["*"]]
    elif len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):  # A1111 emb_params; diffusers {token: tensor}
        tensors = [next(iter(state.values()))]
    else:
        raise EmbeddingError(
            f"--embedding {path} is not a textual-inversion embedding of a known format (A1111's string_to_param "
            f"or emb_params, diffusers' single token, SDXL's clip_l and clip_g); its keys: {', '.join(map(str, state))}."
        )
    if len(tensors) != encoders:
        raise EmbeddingError(
            f"--embedding {path} has vectors for one text encoder (an SD 1.x/2.x embedding), but the model is "
            f"{family.title}, which needs one for each of its {encoders} (clip_l and clip_g); use an embedding made for it."
        )
    vectors = tuple(t.detach().to("cpu", torch.float32).reshape(-1, t.shape[-1]) for t in tensors)
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingError(f"--embedding {path}: its clip_l and clip_g hold different numbers of vectors.")
    return vectors


def check_dimensions(embedding: Embedding, family: ModelFamily, widths: list[int | None], model: str) -> None:
    """Each encoder's vectors as wide as that encoder's token embeddings (a 768-d embedding on a 1024-d encoder is another model's)."""
    for encoder, vectors, width in zip(family.text_encoders, embedding.vectors, widths):
        if width is not None and vectors.shape[-1] != width:
            raise EmbeddingError(
                f"--embedding {embedding.path} has {vectors.shape[-1]}-wide vectors, but model {model}'s "
                f"{encoder.text_encoder} embeds tokens in {width}: it was made for another model (SD 1.x is 768, "
                "SD 2.x 1024, SDXL 768 and 1280); use an embedding trained for this model's family."
            )


def _encoder_widths(info: ModelInfo, family: ModelFamily) -> list[int | None]:
    """Each text encoder's width from its config where the model is a local folder (else checked once loaded)."""
    widths = []
    for encoder in family.text_encoders:
        try:
            widths.append(int(json.loads((Path(info.source) / encoder.text_encoder / "config.json").read_text())["hidden_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            widths.append(None)
    return widths


def read_embeddings(specs, info: ModelInfo, allow_pickle: bool = False) -> tuple[Embedding, ...]:
    """Each `PATH[:TOKEN]` read and checked against the model's family and encoder widths (no weights loaded)."""
    family = FAMILIES[info.family]
    widths = _encoder_widths(info, family)
    embeddings = []
    for spec in specs or ():
        path, token = parse_spec(spec)
        state = read_state_dict(path, allow_pickle)
        with open(Path(path).expanduser(), "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        embedding = Embedding(path, token, sha256, embedding_vectors(state, family, path))
        check_dimensions(embedding, family, widths, info.ref)
        embeddings.append(embedding)
    tokens = [e.token.lower() for e in embeddings]  # CLIP's tokenizer reads prompts lower-cased
    clashes = sorted({t for t in tokens if tokens.count(t) > 1})
    if clashes:
        raise EmbeddingError(f"--embedding: two embeddings share the token {', '.join(clashes)}; give each its own with PATH:TOKEN.")
    return tuple(embeddings)


def with_embeddings(info: ModelInfo, specs, allow_pickle: bool = False) -> ModelInfo:
    """The model with these embeddings: its fingerprint extended by each one's content and token (order aside),
    since they change its images, so rows, resume and the components cache tell the two models apart."""
    embeddings = read_embeddings(specs, info, allow_pickle)
    if not embeddings:
        return info
    digest = hashlib.sha256(info.fingerprint.encode())
    for token, sha256 in sorted((e.token, e.sha256) for e in embeddings):
        digest.update(f"embedding\0{token}\0{sha256}\n".encode())
    return replace(info, fingerprint=digest.hexdigest()[:16], embeddings=embeddings)


def multi_vector_tokens(embedding: Embedding) -> list[str]:
    """The tokenizer tokens of an embedding, as diffusers names them: TOKEN, TOKEN_1, ... TOKEN_{n-1}."""
    return [embedding.token] + [f"{embedding.token}_{i}" for i in range(1, embedding.vectors[0].shape[0])]


def _textual_inversion_loader():
    """diffusers' TextualInversionLoaderMixin on a host of its own: it expects a pipeline, sdflow keeps a dict."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    class Loader(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}  # no accelerate offload hooks to lift while the embeddings load

    return Loader()


def load_embeddings(embeddings: tuple[Embedding, ...], family: ModelFamily, modules: dict, model: str) -> None:
    """Add each embedding to every text encoder of the family, checked first so that nothing half-loads.

    Mutates the tokenizers and text encoders in `modules`: call it on a fresh load only (load_components does).
    """
    if not embeddings:
        return
    pairs = [(modules[e.tokenizer], modules[e.text_encoder]) for e in family.text_encoders]
    for embedding in embeddings:
        widths = [encoder.get_input_embeddings().weight.shape[-1] for _, encoder in pairs]
        check_dimensions(embedding, family, widths, model)
        for tokenizer, _ in pairs:
            vocab = {word.lower() for word in tokenizer.get_vocab()}
            taken = [t for t in multi_vector_tokens(embedding) if t.lower() in vocab]
            if taken:
                raise EmbeddingError(
                    f"--embedding {embedding.path}: its token {taken[0]!r} is already a token of model {model}'s "
                    f"tokenizer, so prompts could not name the embedding; give it another with {embedding.path}:TOKEN."
                )
    loader = _textual_inversion_loader()
    for embedding in embeddings:
        for (tokenizer, encoder), vectors in zip(pairs, embedding.vectors):
            loader.load_textual_inversion(vectors, token=embedding.token, tokenizer=tokenizer, text_encoder=encoder)
            encoder.requires_grad_(False)  # the resized token embeddings are a new parameter


def expand_tokens(texts: list[str], embeddings: tuple[Embedding, ...]) -> list[str]:
    """Each multi-vector embedding's token written as all its tokens (TOKEN TOKEN_1 ...), as diffusers' pipelines do
    (maybe_convert_prompt) where a prompt spells the token in lower case; here in any case, as CLIP's tokenizer
    matches it in any case (it lower-cases prompts), so every vector is used, as in A1111."""
    for embedding in embeddings:
        tokens = multi_vector_tokens(embedding)
        if len(tokens) > 1:
            pattern = re.compile(re.escape(embedding.token), re.IGNORECASE)
            texts = [pattern.sub(lambda m: " ".join([m.group()] + tokens[1:]), t) for t in texts]
    return texts
