"""Pack what a lent GPU machine lacks to run sdflow into one archive: .whl/site.tar.xz (.gitignore's).

    python tests/bench/gpu_bundle.py

The GPU machine (nvidia-h200, Python 3.12) has PyTorch, transformers, accelerate, peft, pandas, pyarrow and pillow,
and no network: Prefect, diffusers and what they need travel with the working tree, which may hold 64 MiB in
all. Their wheels (this project's pinned versions, from constraints.txt) come to about 40 MB, too much beside the
checkout's 30 MB; unpacked and compressed with xz they are about 25 MB. On the machine:

    mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD

Unpacking a wheel into a folder on PYTHONPATH is what `pip install --target` does for these (no compiled steps,
no scripts needed: sdflow starts its Prefect server with `python -c`). The machine's image lists its packages in
../.library/device/KINDS.md; ON_MACHINE is that list, and what is on it is not packed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
WANTED = ["prefect", "diffusers", "fastapi<0.151"]  # as pyproject.toml asks; versions from constraints.txt

# The machine image's packages (KINDS.md, "Python packages already there", read 2026-11-17).
ON_MACHINE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())


def project_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        command = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
                   "--implementation", "cp", "-d", str(wheels), "-c", str(REPO / "constraints.txt"), *WANTED]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"pip download failed:\n{done.stdout}{done.stderr}")
        packed = []
        for wheel in sorted(wheels.glob("*.whl")):
            if project_name(wheel) not in ON_MACHINE:
                zipfile.ZipFile(wheel).extractall(site)
                packed.append(wheel.name)
        target = REPO / ".whl" / "site.tar.xz"
        target.parent.mkdir(exist_ok=True)
        with tarfile.open(target, "w:xz") as tar:
            tar.add(site, arcname=".")
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB, {len(packed)} packages:")
    print(" ".join(packed))


if __name__ == "__main__":
    main()
