"""Opt-in torch.compile (--compile) of the U-Net and the VAE decoder, with the compiled code cached on disk.

Inductor's FX graph cache keeps each compiled graph (generated code and, on CPU, the built C++ library) under
SDFLOW_CACHE/torch-compile, keyed by the graph, its input shapes and dtypes, and the versions of torch and the
compiler: a second process re-traces the modules with Dynamo (seconds) and loads the code instead of
generating and building it again (minutes on a CPU). Dynamo's profile of which dimensions changed (PGO) is kept
in the same folder, so a run that saw batches of several sizes starts the next with those dimensions dynamic.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("sdflow")


def compile_components(unet: torch.nn.Module, vae: torch.nn.Module, cache: str) -> None:
    """Compile the U-Net and the VAE decoder in place (nn.Module.compile: the modules stay what they were, their
    calls go through the compiled code), caching what inductor builds in `cache` (TORCHINDUCTOR_CACHE_DIR).

    The caller passes a folder under SDFLOW_CACHE, always: torch sets TORCHINDUCTOR_CACHE_DIR itself (to
    /tmp/torchinductor_USER) the first time anything asks for the folder, so a value found in the environment may
    be torch's own default.

    Compilation happens lazily, at the first batch of each shape. Shapes are static at first (the fastest code);
    a dimension seen with a second value (the last, smaller batch of a shard; a batch halved after out of memory;
    another image size) is compiled once more as dynamic, so varying batches cost one more compilation, not one each.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # inductor reads it each time it needs the folder
    torch._inductor.config.fx_graph_cache = True  # the default in torch 2.13; set so that an environment cannot turn it off
    unet.compile(dynamic=None)
    vae.decoder.compile(dynamic=None)
    log.info("compiling the U-Net and VAE decoder at their first batch; cache in %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
