"""Prompts as AUTOMATIC1111 reads them (emphasis, BREAK, 75-token chunks) and clip skip, for SD and SDXL.

Parsing is held to A1111's documented examples; chunked and weighted embeddings to the same chunks encoded one by
one and weighted by hand; prompts without syntax, and clip skip, to diffusers' own pipelines.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from nodes.dataset.ingest import resolve_defaults
from nodes.dataset.store import infotext
from nodes.errors import PromptTableError
from nodes.params import Row
from nodes.pipeline.batch import make_batches
from nodes.pipeline.components import inspect_model, load_components
from nodes.pipeline.encode import batch_key, encode_prompts, uses_guidance
from nodes.pipeline.prompts import chunk_input_ids, parse_prompt_attention, prompt_chunks, unclosed_brackets
from nodes.shapes.builders import TOY_WORDS, toy_tokenizer_files
from tests.support.reference import diffusers_pipeline, generate, max_level_difference
from tests.support.tables import write_table


def toy_tokenizer(**options) -> CLIPTokenizer:
    vocab, merges = toy_tokenizer_files(TOY_WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **options)


WORDS = [w for w in TOY_WORDS if len(toy_tokenizer()(w, add_special_tokens=False).input_ids) == 1]  # one token each


def words(n: int, start: int = 0) -> str:
    """`n` known words, one token each: a prompt of exactly n tokens."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


LONG = words(200)  # 200 tokens: chunks of 75, 75 and 50


# ------------------------------------------------------------------ parsing: A1111's documented examples


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parsing_gives_a1111s_documented_results(text, parsed):
    assert parse_prompt_attention(text) == parsed


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("[word]", [("word", 1 / 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("(word:0.5) [[x]]", [("word", 0.5), (" ", 1.0), ("x", 1 / 1.1 / 1.1)]),
        ("a) b] c", [("a) b] c", 1.0)]),  # closing brackets with none open are text
        ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
        ("time: 10:30 (x:y)", [("time: 10:30 ", 1.0), ("x:y", 1.1)]),  # a colon is text unless a weight closes a bracket
        ("red BREAK blue", [("red", 1.0), None, ("blue", 1.0)]),
        ("(red BREAK blue)", [("red", 1.1), None, ("blue", 1.1)]),
        ("BREAKFAST break", [("BREAKFAST break", 1.0)]),  # only the word BREAK, in capitals
        ("", [("", 1.0)]),
        # A1111's prompt editing, alternation and AND are not sdflow's: text like any other (README, Prompts).
        ("[a:b:10] [c|d] e AND f", [("a:b:10", 1 / 1.1), (" ", 1.0), ("c|d", 1 / 1.1), (" e AND f", 1.0)]),
    ],
)
def test_brackets_escapes_and_break(text, parsed):
    assert parse_prompt_attention(text) == parsed


def test_unclosed_brackets_are_counted_and_warned_with_the_row(sd, caplog):
    assert [unclosed_brackets(t) for t in ("(a [b", "(a) [b]", "a) b]", "\\(a", "((a:1.2)")] == [2, 0, 0, 0, 1]
    log = logging.getLogger("sdflow")
    log.addHandler(caplog.handler)  # the CLI's in-process runs stop sdflow's records reaching the root logger
    try:
        with caplog.at_level(logging.WARNING, logger="sdflow"):
            encode_prompts(sd, [row("a (red circle", "[blurry", position=0), row("a blue) square", "x", position=1)])
    finally:
        log.removeHandler(caplog.handler)
    assert list(dict.fromkeys(r.getMessage().split(",")[0] for r in caplog.records)) == [
        "row 'r0': prompt has 1 unclosed bracket(s)", "row 'r0': negative prompt has 1 unclosed bracket(s)"
    ]


# ------------------------------------------------------------------ chunks of 75 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_a_long_prompt_is_cut_into_chunks_of_75_tokens(tokenizer):
    chunks = prompt_chunks(tokenizer, LONG)
    assert [len(c.ids) for c in chunks] == [75, 75, 50]
    assert [t for c in chunks for t in c.ids] == ids_of(tokenizer, LONG)
    assert all(w == 1.0 for c in chunks for w in c.weights)
    assert [len(c.ids) for c in prompt_chunks(tokenizer, words(75))] == [75]  # exactly full: one chunk
    assert [len(c.ids) for c in prompt_chunks(tokenizer, words(76))] == [75, 1]


def test_a_full_chunk_moves_the_words_after_a_recent_comma_to_the_next(tokenizer):
    near = words(70) + ", " + words(30, 70)  # the comma is the 71st token: within 20 of the chunk's end
    chunks = prompt_chunks(tokenizer, near)
    assert [len(c.ids) for c in chunks] == [71, 30]
    assert chunks[0].ids[-1] == tokenizer.convert_tokens_to_ids(",</w>")
    assert [t for c in chunks for t in c.ids] == ids_of(tokenizer, near)
    far = words(40) + ", " + words(60, 40)  # 35 tokens back: too far, the chunk is cut at 75
    assert [len(c.ids) for c in prompt_chunks(tokenizer, far)] == [75, 26]


def test_break_starts_a_new_chunk_and_weights_follow_their_tokens(tokenizer):
    chunks = prompt_chunks(tokenizer, "red circle BREAK (blue:1.5) square")
    assert [c.ids for c in chunks] == [tuple(ids_of(tokenizer, "red circle")), tuple(ids_of(tokenizer, "blue square"))]
    assert [c.weights for c in chunks] == [(1.0, 1.0), (1.5, 1.0)]
    assert [c.ids for c in prompt_chunks(tokenizer, "BREAK red")] == [(), tuple(ids_of(tokenizer, "red"))]
    assert [c.ids for c in prompt_chunks(tokenizer, "")] == [()]


@pytest.mark.parametrize("pad", [None, "!"])  # SD 1.x pads with EOS; SD 2.x and SDXL's second tokenizer with "!"
def test_a_chunk_is_laid_out_as_the_tokenizer_pads_a_whole_prompt(pad):
    tok = toy_tokenizer(**({"pad_token": pad} if pad else {}))
    text = "a small red circle on the left"
    (chunk,) = prompt_chunks(tok, text)
    whole = tok(text, padding="max_length", max_length=77)
    assert chunk_input_ids(tok, chunk) == (whole.input_ids, whole.attention_mask)


# ------------------------------------------------------------------ embeddings: Stable Diffusion 1.x/2.x


@pytest.fixture(scope="module")
def sd(tiny_model):
    return load_components(inspect_model(tiny_model), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def sd_pipe(tiny_model):
    pipe = diffusers_pipeline(StableDiffusionPipeline, tiny_model, safety_checker=None, requires_safety_checker=False)
    if not hasattr(pipe.text_encoder, "text_model"):
        # diffusers 0.42's clip_skip reads `text_encoder.text_model.final_layer_norm`, a wrapper transformers 5.6
        # removed (huggingface/diffusers#14124, fixed by #14043 with this same fallback): the alias lets diffusers'
        # own clip_skip code run unchanged. Set past nn.Module's registry, so it is no submodule (no cycle).
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    return pipe


def row(prompt, negative="", guidance=7.5, clip_skip=0, position=0, seed=5, **sdxl):
    return Row(position, f"r{position}", prompt, negative, seed, 4, guidance, 64, 64, clip_skip=clip_skip, **sdxl)


def padded(tokenizer, ids: list[int]) -> torch.Tensor:
    """BOS + ids + EOS, padded to 77 with the tokenizer's pad token: one chunk as A1111 feeds it to CLIP."""
    seq = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return torch.tensor([seq + [tokenizer.pad_token_id] * (77 - len(seq))])


def test_a_200_token_prompt_is_its_75_token_chunks_encoded_one_by_one(sd):
    tokenizer, encoder = sd.modules["tokenizer"], sd.modules["text_encoder"]
    ids = ids_of(tokenizer, LONG)
    assert len(ids) == 200
    want = torch.cat([encoder(padded(tokenizer, ids[i : i + 75]))[0] for i in range(0, 200, 75)], dim=1)
    got = encode_prompts(sd, [row(LONG, guidance=1.0)]).prompt_embeds
    assert got.shape == (1, 3 * 77, encoder.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    truncated = encoder(tokenizer(LONG, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(got[:, :77], truncated, rtol=0, atol=1e-5)  # the first chunk is what truncation kept


def test_the_shorter_of_prompt_and_negative_prompt_is_padded_with_empty_chunks(sd):
    tokenizer, encoder = sd.modules["tokenizer"], sd.modules["text_encoder"]
    embeds = encode_prompts(sd, [row("a red circle", negative=LONG)])
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (1, 3 * 77, encoder.config.hidden_size)
    empty = encoder(padded(tokenizer, []))[0]
    for chunk in (1, 2):
        torch.testing.assert_close(embeds.prompt_embeds[:, 77 * chunk : 77 * (chunk + 1)], empty, rtol=0, atol=1e-5)


def a1111_emphasis(encoder, tokenizer, text: str) -> torch.Tensor:
    """One chunk weighted by hand, as A1111 documents its emphasis: each token's embedding times its weight, then
    scaled back to the unweighted mean."""
    ids, weights = [], [1.0]
    for fragment, weight in parse_prompt_attention(text):
        fragment_ids = ids_of(tokenizer, fragment)
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    z = encoder(padded(tokenizer, ids))[0]
    weights += [1.0] * (77 - len(weights))
    weighted = z * torch.tensor(weights).view(1, 77, 1)
    return weighted * (z.mean() / weighted.mean())


def test_weights_multiply_token_embeddings_and_keep_the_mean(sd):
    tokenizer, encoder = sd.modules["tokenizer"], sd.modules["text_encoder"]
    text = "a (red:1.5) circle [on] the ((left))"
    got = encode_prompts(sd, [row(text, guidance=1.0)]).prompt_embeds
    torch.testing.assert_close(got, a1111_emphasis(encoder, tokenizer, text), rtol=0, atol=1e-5)
    plain = encode_prompts(sd, [row("a red circle on the left", guidance=1.0)]).prompt_embeds
    assert (got - plain).abs().max() > 0.05  # the weights change the embedding
    torch.testing.assert_close(got.mean(), plain.mean(), rtol=0, atol=1e-6)  # and the mean stays the unweighted one


def test_prompts_without_syntax_are_diffusers_encode_prompt_bit_for_bit(sd, sd_pipe):
    for prompt, negative in [("a small red circle on the left", "blurry"), ("time: 10:30, a cat", ""), (words(75), words(60))]:
        embeds = encode_prompts(sd, [row(prompt, negative)])
        want, want_negative = sd_pipe.encode_prompt(prompt, "cpu", 1, True, negative or None)
        assert torch.equal(embeds.prompt_embeds, want) and torch.equal(embeds.negative_prompt_embeds, want_negative), prompt


# ------------------------------------------------------------------ clip skip: diffusers' clip_skip


def diffusers_image(pipe, r: Row, sdxl: bool = False) -> np.ndarray:
    """diffusers' image for the row alone with clip_skip=row.clip_skip. diffusers skips layers for the prompt only;
    sdflow, as A1111, for the negative prompt too: there the negative's embeddings are diffusers' own encode_prompt's
    of it with the same clip_skip, passed in (an empty one too, except where SDXL makes it zeros)."""
    options = {"clip_skip": r.clip_skip or None}
    if r.clip_skip and uses_guidance(r.guidance_scale) and (r.negative_prompt or not sdxl):
        if sdxl:
            negative, _, negative_pooled, _ = pipe.encode_prompt(r.negative_prompt, device="cpu", do_classifier_free_guidance=False, clip_skip=r.clip_skip)
            options.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        else:
            options["negative_prompt_embeds"] = pipe.encode_prompt(r.negative_prompt, "cpu", 1, False, clip_skip=r.clip_skip)[0]
    else:
        options["negative_prompt"] = r.negative_prompt or None
    image = pipe(
        r.prompt, num_inference_steps=r.steps, guidance_scale=r.guidance_scale, width=r.width, height=r.height,
        generator=torch.Generator("cpu").manual_seed(r.seed), **options,
    ).images[0]
    return np.asarray(image)


# One batch: clip skips 0 and 1, with and without guidance, with a negative prompt and without.
CLIP_ROWS = [
    row("a small red circle on the left", clip_skip=1, guidance=1.0, position=0, seed=11),
    row("a large blue square at the top", "red", clip_skip=1, position=1, seed=22),
    row("a green triangle in the centre", "", clip_skip=1, position=2, seed=33),
    row("a yellow star at the bottom", "blurry", clip_skip=0, position=3, seed=44),
]


def test_clip_skip_matches_diffusers_in_a_mixed_batch(sd, sd_pipe):
    ours = generate(sd, CLIP_ROWS, None)
    for i, r in enumerate(CLIP_ROWS):
        assert max_level_difference(ours[i], diffusers_image(sd_pipe, r)) <= 1, r.id
    skipped_none = generate(sd, [row(CLIP_ROWS[1].prompt, "red", clip_skip=0, position=1, seed=22)], None)[0]
    assert max_level_difference(skipped_none, ours[1]) > 8  # clip skip changes the image


def test_clip_skip_beyond_the_text_encoder_is_refused_naming_the_row(sd, tmp_path, tiny_model):
    layers = sd.modules["text_encoder"].config.num_hidden_layers
    assert batch_key(sd, row("a cat", clip_skip=layers - 1))  # the first layer's output: allowed
    with pytest.raises(PromptTableError, match=rf"row 'r0': clip_skip {layers} .* at most {layers - 1}"):
        batch_key(sd, row("a cat", clip_skip=layers))
    from nodes.dataset.ingest import plan_prompt_table

    info = inspect_model(tiny_model)
    defaults = resolve_defaults(info, None, None, None, None, None, 0)
    for bad in (-1, 1.5):
        path = write_table(tmp_path / "t.parquet", [{"id": 7, "prompt": "a cat", "clip_skip": bad}])
        with pytest.raises(PromptTableError, match=r"column 'clip_skip'.*id 7"):
            plan_prompt_table(path, defaults, info.size_multiple, 10, ("euler", "m"))
    with pytest.raises(PromptTableError, match="--clip-skip -1"):
        resolve_defaults(info, None, None, None, None, None, 0, clip_skip=-1)


def test_clip_skip_is_part_of_the_row_key():
    from nodes.dataset.ingest import row_key

    assert row_key(row("a cat", clip_skip=1), "euler", "m") != row_key(row("a cat"), "euler", "m")


def test_infotext_records_clip_skip_as_a1111_counts_it():
    skipped = infotext(row("a cat", clip_skip=1), "euler", "m", "1")
    assert "Model: m, Clip skip: 2, Version: sdflow 1" in skipped
    assert "Clip skip" not in infotext(row("a cat"), "euler", "m", "1")  # A1111 writes it only from 2 on


# ------------------------------------------------------------------ a row alone equals the row in its batch


def test_long_and_weighted_prompts_batch_apart_by_chunks_and_alone_equal_batched(sd):
    rows = [
        row("a small red circle on the left", "blurry", position=0, seed=1),
        row(LONG, "", position=1, seed=2),
        row("a (large:1.4) [blue] square", "red", position=2, seed=3, clip_skip=1),
        row(words(60) + " BREAK (green:1.3) triangle", "cat", position=3, seed=4),
        row("a photo of a dog", words(90), position=4, seed=5, guidance=1.0),  # unguided: its long negative is unused
        row(words(120) + ", (red:0.7) star", "", position=5, seed=6, clip_skip=1),
    ]
    batches = make_batches(rows, 8, lambda r: batch_key(sd, r))
    assert [[r.position for r in b] for b in batches] == [[0, 2, 4], [1], [3, 5]]  # 1, 3 and 2 chunks
    for batch in batches:
        images = generate(sd, batch, "euler_a")
        for r, image in zip(batch, images):
            assert max_level_difference(generate(sd, [r], "euler_a")[0], image) <= 1, r.id


# ------------------------------------------------------------------ Stable Diffusion XL


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    return load_components(inspect_model(tiny_sdxl), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl):
    return diffusers_pipeline(StableDiffusionXLPipeline, tiny_sdxl)


def xl_row(prompt, negative="", guidance=5.0, clip_skip=0, position=0, seed=5):
    return row(prompt, negative, guidance, clip_skip, position, seed, original_size=(64, 64), crops_coords_top_left=(0, 0), target_size=(64, 64))


def test_sdxl_clip_skip_limit_counts_back_from_the_penultimate_layer(xl):
    layers = min(xl.modules[name].config.num_hidden_layers for name in ("text_encoder", "text_encoder_2"))
    assert batch_key(xl, xl_row("a cat", clip_skip=layers - 2))
    with pytest.raises(PromptTableError, match=rf"clip_skip {layers - 1} .* \(0 to {layers - 2}: 0 uses the penultimate"):
        batch_key(xl, xl_row("a cat", clip_skip=layers - 1))


def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk(xl):
    ids = ids_of(xl.modules["tokenizer"], LONG)
    features = []
    for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = xl.modules[tokenizer], xl.modules[encoder]
        outputs = [enc(padded(tok, ids[i : i + 75]), output_hidden_states=True) for i in range(0, 200, 75)]
        features.append(torch.cat([o.hidden_states[-2] for o in outputs], dim=1))
    embeds = encode_prompts(xl, [xl_row(LONG, guidance=1.0)])
    torch.testing.assert_close(embeds.prompt_embeds, torch.cat(features, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds.pooled_prompt_embeds, outputs[0][0], rtol=0, atol=1e-5)  # A1111 pools chunk 1


def test_sdxl_prompts_without_syntax_are_diffusers_encode_prompt_bit_for_bit(xl, xl_pipe):
    prompt, negative = "a small red circle on the left", "blurry"
    embeds = encode_prompts(xl, [xl_row(prompt, negative)])
    want = xl_pipe.encode_prompt(prompt, device="cpu", negative_prompt=negative)
    got = (embeds.prompt_embeds, embeds.negative_prompt_embeds, embeds.pooled_prompt_embeds, embeds.negative_pooled_prompt_embeds)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sdxl_clip_skip_matches_diffusers_in_a_mixed_batch(xl, xl_pipe):
    rows = [
        xl_row("a small red circle on the left", "", clip_skip=1, position=0, seed=11),  # zeros for its negative
        xl_row("a large blue square at the top", "red", clip_skip=1, position=1, seed=22),
        xl_row("a green triangle in the centre", "", clip_skip=0, position=2, seed=33),
        xl_row("a yellow star at the bottom", "", clip_skip=1, guidance=1.0, position=3, seed=44),
    ]
    ours = generate(xl, rows, None)
    for i, r in enumerate(rows):
        assert max_level_difference(ours[i], diffusers_image(xl_pipe, r, sdxl=True)) <= 1, r.id
    unskipped = generate(xl, [xl_row(rows[0].prompt, "", position=0, seed=11)], None)[0]
    assert max_level_difference(unskipped, ours[0]) > 8


def test_sdxl_weighted_and_long_rows_alone_equal_batched(xl):
    rows = [
        xl_row("a (red:1.4) circle [on] the left", "blurry", position=0, seed=1),
        xl_row("a blue square", "", position=1, seed=2, clip_skip=1),
        xl_row(LONG, "(green:1.2)", position=2, seed=3),
        xl_row(words(100) + " BREAK yellow", "", position=3, seed=4, clip_skip=1),
    ]
    batches = make_batches(rows, 8, lambda r: batch_key(xl, r))
    assert [[r.position for r in b] for b in batches] == [[0, 1], [2, 3]]  # 1 and 3 chunks
    for batch in batches:
        images = generate(xl, batch, "euler")
        for r, image in zip(batch, images):
            assert max_level_difference(generate(xl, [r], "euler")[0], image) <= 1, r.id
