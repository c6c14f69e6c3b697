"""Storage: image encoding (PNG, WebP, JPEG) with AUTOMATIC1111 infotext, Parquet shards that `datasets` decodes, whole-file writes, the output location.

Layout of an output dataset (local folder or any fsspec URL):
    OUT/data/part-NNNNN-ATTEMPT.parquet   one shard per chunk of prompt-table rows; a plain glob of data/ is the dataset
    OUT/_shards/NNNNN.json                each shard's marker, written after its data (nodes.dataset.commit)
    OUT/_index/NNNNN.npz                  the committed row keys and shards as a run left them, read before the markers
    OUT/manifest.json                     run parameters, versions, row counts, shards and timings, written last (nodes.dataset.manifest)
Files are written whole: locally to a temporary name, fsynced and renamed; on object stores as one upload.
sdflow touches only these names (OWN_FILE) under OUT/, and refuses an output that holds anything else.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import ExifTags, Image, PngImagePlugin

from nodes.errors import SdflowError, StorageError
from nodes.faults import crash_point
from nodes.params import COLUMNS, SAMPLERS, ImageFormat, Row

ROW_GROUP_ROWS = 64  # rows per Parquet row group: a few MB of 512px images, what `datasets` streams by
PNG_COMPRESS_LEVEL = 6  # zlib level; PNG is lossless at every level, lower only trades size for speed

# Line breaks as Python's str.splitlines sees them: A1111 splits infotext on "\n" only, other readers on any of these.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _json_string(text: str) -> str:
    """`text` as a JSON string on one line: json.dumps leaves the non-ASCII line breaks as they are."""
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _quote(value) -> str:
    """Quote an infotext value as AUTOMATIC1111 does: JSON string syntax where it holds , : " or a line break."""
    text = str(value)
    return _json_string(text) if any(c in text for c in ',:"' + _LINE_BREAKS) else text


def _prompt_line(text: str) -> str:
    """A prompt as one infotext line that A1111's parser gives back whole.

    A1111 writes prompts raw, so a prompt holding a line break could forge a "Negative prompt:" line or the
    settings line, and its parser strips each line. Such a prompt (and one with outer whitespace, or starting
    like a negative prompt or a quote) is written as a JSON string instead, the syntax A1111 uses for its own
    values; a reader that unquotes a prompt starting with `"` gets it back exactly. Other prompts are as A1111 writes them.
    """
    plain = text == text.strip() and not text.startswith(('"', "Negative prompt:")) and not any(c in text for c in _LINE_BREAKS)
    return text if plain else _json_string(text)


def model_fields(info) -> tuple[tuple[str, str], ...]:
    """A model (nodes.pipeline.components.ModelInfo) as A1111's infotext names it: its hash and name, and the VAE's."""
    fields = (("Model hash", info.model_hash), ("Model", info.ref))
    if info.vae:
        fields += (("VAE hash", info.vae_hash),) if info.vae_hash else ()
        fields += (("VAE", os.path.basename(info.vae.rstrip("/"))),)
    return fields


def infotext(
    row: Row, scheduler: str, model: str | tuple[tuple[str, str], ...], version: str, embeddings: tuple[tuple[str, str], ...] = ()
) -> str:
    """The row's generation parameters in AUTOMATIC1111's "parameters" format: prompt, negative prompt, settings,
    one line each (see _prompt_line). `model`: its name, or its fields (model_fields); `embeddings`: the run's
    textual inversions as (token, short hash)."""
    known = SAMPLERS.get(scheduler)
    fields = [("Steps", row.steps), ("Sampler", known.a1111 if known else scheduler)]
    if known and known.schedule:
        fields.append(("Schedule type", known.schedule))
    fields += [
        ("CFG scale", f"{row.guidance_scale:g}"),
        ("Seed", row.seed),
        ("Size", f"{row.width}x{row.height}"),
        *((("Model", model),) if isinstance(model, str) else model),
    ]
    if row.loras:  # as A1111 records the LoRAs of a prompt: "name: short hash, ..." (its names without : and ,)
        names = [lora.name.replace(":", "").replace(",", "") for lora in row.loras]
        fields.append(("Lora hashes", ", ".join(f"{name}: {lora.short_hash}" for name, lora in zip(names, row.loras))))
    if row.clip_skip:  # A1111 counts the last layer as 1 (diffusers' 0) and writes it only from 2 on
        fields.append(("Clip skip", row.clip_skip + 1))
    hashes = ti_hashes(row, embeddings)
    if hashes:
        fields.append(("TI hashes", hashes))
    fields.append(("Version", f"sdflow {version}"))
    lines = [_prompt_line(row.prompt)]
    if row.negative_prompt:
        lines.append(f"Negative prompt: {_prompt_line(row.negative_prompt)}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def ti_hashes(row: Row, embeddings: tuple[tuple[str, str], ...]) -> str:
    """A1111's `TI hashes` value: "token: short hash" of each embedding the row's prompts use, A1111's way (its
    name without `:` and `,`), where CLIP's tokenizer finds the token: anywhere, in any case."""
    texts = f"{row.prompt}\n{row.negative_prompt}".lower()
    used = [(token, short) for token, short in embeddings if token.lower() in texts]
    return ", ".join(f"{token.replace(':', '').replace(',', '')}: {short}" for token, short in used)


def encode_png(pixels: np.ndarray, parameters: str) -> bytes:
    """Lossless PNG of an (H, W, 3) uint8 array, with `parameters` in an iTXt chunk (UTF-8)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# EXIF UserComment's character-code prefix for UTF-16 text, as piexif.helper.UserComment.dump(text, encoding="unicode")
# writes it for AUTOMATIC1111: 8 bytes "UNICODE\0", then the text in UTF-16 big-endian.
UNICODE_COMMENT = b"UNICODE\x00"


def infotext_exif(parameters: str) -> Image.Exif:
    """EXIF holding only `parameters`, in the Exif IFD's UserComment, where AUTOMATIC1111 puts a JPEG's or WebP's infotext.

    No Orientation tag: `datasets` would transpose an image that had one.
    """
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = UNICODE_COMMENT + parameters.encode("utf-16-be")
    return exif


def encode_image(pixels: np.ndarray, parameters: str, image: ImageFormat = ImageFormat()) -> bytes:
    """An (H, W, 3) uint8 array as `image` says, with `parameters` where the format allows: PNG's text chunk,
    else EXIF UserComment (infotext_exif). WebP is lossless without a quality; JPEG is 4:2:0, Pillow's default.

    Raises ValueError("EXIF data is too long") for JPEG when the infotext exceeds the 64 KB of a JPEG marker.
    """
    if image.name == "png":
        return encode_png(pixels, parameters)
    options = {"lossless": True} if image.lossless else {"quality": image.quality}
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format=image.name.upper(), exif=infotext_exif(parameters), **options)
    return buffer.getvalue()


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def encoding_pool() -> ThreadPoolExecutor:
    """One thread per core, shared by every batch in flight. Pillow releases the GIL while zlib, libwebp and libjpeg
    compress, so these threads encode on all cores at once; a batch's images encoded one after another would keep
    a batch of 8 on one core while the device waits. Memory stays bounded by the batches in flight."""
    return ThreadPoolExecutor(max_workers=machine_cores(), thread_name_prefix="sdflow-encode")


@functools.lru_cache(maxsize=1)
def batch_encoder() -> ThreadPoolExecutor:
    """Where a batch's encode_images waits for its images (encoded on encoding_pool) while the engine goes on to the
    next batch: not on the encoding pool itself, whose threads it would hold waiting on their own work. The engine
    keeps at most `batches_in_flight` batches here."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="sdflow-batch-encode")


def _encode_row(pixels: np.ndarray, row: Row, parameters: str, image: ImageFormat) -> bytes:
    try:
        return encode_image(pixels, parameters, image)
    except ValueError as e:
        if image.name != "jpeg" or "EXIF" not in str(e):
            raise
        raise SdflowError(
            f"row {row.id!r}: its infotext ({len(parameters)} characters) does not fit in a JPEG's EXIF, which "
            "holds about 32,000 characters of UTF-16 text; shorten its prompts, or use --image-format webp or png."
        ) from None


def encode_images(
    images, rows: list[Row], scheduler: str, model: str | tuple[tuple[str, str], ...], version: str, image: ImageFormat = ImageFormat(),
    embeddings: tuple[tuple[str, str], ...] = (),
) -> dict[tuple[int, int], bytes]:
    """Encoded images (encode_image) for a batch of images (B, H, W, 3) uint8, keyed by Row.slot in row order;
    `embeddings` as infotext takes them. The images are encoded in parallel on encoding_pool(), and this returns
    when all are done."""
    pixels = np.asarray(images)
    parameters = [infotext(row, scheduler, model, version, embeddings) for row in rows]
    encoded = encoding_pool().map(_encode_row, pixels, rows, parameters, [image] * len(rows))
    return {row.slot: data for row, data in zip(rows, encoded)}


def image_parameters(data: bytes) -> str | None:
    """The infotext stored in an encoded image: PNG's `parameters` text chunk, or a JPEG's or WebP's EXIF UserComment
    (read as AUTOMATIC1111 reads it: UTF-16 big-endian after "UNICODE\\0"); None if it holds none."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return image.text.get("parameters")
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if comment is None:
        return None
    if comment.startswith(UNICODE_COMMENT):
        return comment[len(UNICODE_COMMENT):].decode("utf-16-be")
    return comment[8:].decode("utf-8", errors="replace")  # another character code (ASCII, undefined): its text as UTF-8


def loadable_type(dtype: pa.DataType) -> pa.DataType:
    """The type a carried column is written as: its own, except where `datasets` has no feature for it.

    A map becomes its list of key-value structs and an extension type (JSON, UUID) its storage type: the same
    values, which every reader loads. Decimals narrower than decimal128 widen to it. Nested types are mapped inside.
    """
    if pa.types.is_map(dtype):
        entries = pa.struct([dtype.key_field, dtype.item_field])
        return pa.list_(loadable_type(entries))
    if isinstance(dtype, pa.BaseExtensionType):
        return loadable_type(dtype.storage_type)
    if pa.types.is_decimal(dtype) and dtype.bit_width < 128:
        return pa.decimal128(dtype.precision, dtype.scale)
    if pa.types.is_struct(dtype):
        return pa.struct([f.with_type(loadable_type(f.type)) for f in dtype])
    if pa.types.is_dictionary(dtype):
        return pa.dictionary(dtype.index_type, loadable_type(dtype.value_type), dtype.ordered)
    for is_list, make in ((pa.types.is_list, pa.list_), (pa.types.is_large_list, pa.large_list)):
        if is_list(dtype):
            return make(dtype.value_field.with_type(loadable_type(dtype.value_type)))
    if pa.types.is_fixed_size_list(dtype):
        return pa.list_(dtype.value_field.with_type(loadable_type(dtype.value_type)), dtype.list_size)
    return dtype


# Value dtypes that `datasets` spells otherwise than str(dtype) (datasets.features.features._arrow_to_datasets_dtype).
_VALUE_DTYPES = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.date32(): "date32", pa.date64(): "date64"}


def _feature(dtype: pa.DataType) -> dict:
    """The Hugging Face `datasets` feature for a (loadable_type) Arrow type, as its JSON metadata spells it.

    Every dtype named here is one `datasets` parses back to the same Arrow type; a dictionary column is declared
    as its values, which is how `datasets` reads one (pandas still reads it back as a categorical).
    """
    if pa.types.is_dictionary(dtype):
        return _feature(dtype.value_type)
    if pa.types.is_struct(dtype):
        return {f.name: _feature(f.type) for f in dtype}
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        feature = {"feature": _feature(dtype.value_type), "_type": "LargeList" if pa.types.is_large_list(dtype) else "List"}
        if pa.types.is_fixed_size_list(dtype):
            feature["length"] = dtype.list_size
        return feature
    # str(dtype) is what `datasets` parses for every other type: null, bool, (u)int8-64, timestamp[unit, tz=…],
    # decimal128(p, s), time32/64, duration, (large_)string, (large_)binary, fixed_size_binary[n], the views.
    name = _VALUE_DTYPES.get(dtype, str(dtype))
    return {"dtype": name, "_type": "Value"}


def huggingface_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """Schema metadata that makes `datasets` decode the `image` column as PIL images, and read every other column."""
    features = {f.name: ({"_type": "Image"} if f.name == "image" else _feature(f.type)) for f in schema}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def shard_table(rows: list[Row], encoded: dict[tuple[int, int], bytes], carried: pa.Table, scheduler: str, model: str) -> pa.Table:
    """The output rows of one shard, in prompt-table order: image, parameters, then carried columns.

    An image's `path` stays None: `datasets` decodes `bytes` with PIL, which reads the format from the bytes.
    `image_index` follows `id` in every row, 0 for a row's only image, so every shard has the same columns.
    """
    images = pa.array([{"bytes": encoded[r.slot], "path": None} for r in rows], type=IMAGE_TYPE)
    columns = {"image": images}
    for column in COLUMNS:
        values = [getattr(r, column.name) for r in rows]
        if column.stored and (column.neutral is not None or any(v is not None for v in values)):  # a family's own, for its rows
            written = [column.written_value(v) for v in values] if column.written_value else values
            columns[column.name] = pa.array(written, column.written)
        if column.name == "id":
            columns["image_index"] = pa.array([r.image_index for r in rows], pa.int32())
    columns["scheduler"] = pa.array([scheduler] * len(rows), pa.string())
    columns["model"] = pa.array([model] * len(rows), pa.string())
    for field in carried.schema:  # as the table holds them, where every reader can load that (loadable_type)
        written = loadable_type(field.type)
        columns[field.name] = carried.column(field.name) if written == field.type else carried.column(field.name).cast(written)
    table = pa.table(columns)
    return table.replace_schema_metadata(huggingface_metadata(table.schema))


STORAGE_OPTIONS_ENV = "SDFLOW_STORAGE_OPTIONS"  # JSON fsspec options; kept out of flow parameters (secrets)


def storage_options_from_env() -> dict:
    """fsspec storage options from SDFLOW_STORAGE_OPTIONS; credentials never travel as flow parameters."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{STORAGE_OPTIONS_ENV} (or --storage-options) is not valid JSON: {e}.") from None
    if not isinstance(options, dict):
        raise StorageError(f"{STORAGE_OPTIONS_ENV} (or --storage-options) must be a JSON object.")
    return options


def open_output(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of an output location: new, or an sdflow dataset to resume or extend.

    Refuses a location that holds files sdflow did not write, and one that cannot be written (checked with
    a probe file, created and deleted, so that a read-only folder, denied credentials or a full disk show
    before a model loads). Leaves nothing behind: folders appear with the first shard.
    """
    if "::" in url:  # fsspec reads it as a chain of filesystems and drops the rest: never write elsewhere than asked
        raise StorageError(
            f"output {url} contains '::', which fsspec reads as a chain of filesystems (e.g. simplecache::s3://...); "
            "sdflow writes to one location as given: rename the folder, or give a plain path or URL."
        )
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        root = root.rstrip("/")
        if hasattr(fs, "split_path"):  # bucket stores (s3fs, gcsfs, adlfs): a missing bucket shows only at a write
            bucket = fs.split_path(root)[0]
            if not fs.exists(bucket):
                raise StorageError(
                    f"output {url} cannot be used: bucket {bucket} does not exist, or these credentials cannot see it."
                )
        foreign = foreign_files(fs, root)
        if foreign:
            raise StorageError(
                f"output {url} holds files that sdflow did not write ({', '.join(foreign[:5])}"
                f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}); an sdflow dataset holds only its "
                "manifest, contact sheet, data/, _shards/, _index/ and evaluation/, and sdflow replaces and deletes files "
                "there: choose a new or empty location, or move those files away."
            )
        check_writable(fs, root, url)
    except StorageError:
        raise
    except NotADirectoryError:
        raise StorageError(f"output {url} is a file, not a folder: choose another location.") from None
    except PermissionError:
        raise StorageError(f"output {url} cannot be written: permission denied.") from None
    except Exception as e:  # store errors: missing bucket, bad credentials, unreachable endpoint
        raise StorageError(f"output {url} cannot be used: {type(e).__name__}: {e}") from None
    return fs, root


# Every file sdflow writes under OUT, by its path relative to OUT (evaluation/ is written by `sdflow evaluate`).
# Cleanup deletes only names that match, and an output holding anything else is refused.
DATA_FILE = r"data/part-\d{5,}(?:-[0-9a-f]{32})?\.parquet"  # -ATTEMPT: one key per commit attempt (nodes.dataset.commit)
OWN_FILE = re.compile(
    rf"manifest\.json|contact_sheet\.png|_shards/\d{{5,}}\.json|_index/\d{{5,}}\.npz|{DATA_FILE}"
    rf"|evaluation/(?:summary\.json|contact_sheet\.png|{DATA_FILE})"
)
TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{32}\.tmp")  # .NAME.UUIDHEX.tmp, beside NAME (write_temporary)
PROBE = "write-probe"  # OUT/.write-probe.UUIDHEX.tmp: check_writable's probe


def is_temporary(name: str) -> bool:
    """A file name of sdflow's temporary shape, .NAME.UUIDHEX.tmp."""
    return TEMPORARY.fullmatch(name) is not None


def is_own(relative: str) -> bool:
    """Whether a path relative to OUT is one that sdflow writes: a dataset file, or a temporary of one."""
    folder, _, name = relative.rpartition("/")
    temporary = TEMPORARY.fullmatch(name)
    if temporary:
        name = temporary.group(1)
        if not folder and name == PROBE:
            return True
    return OWN_FILE.fullmatch(f"{folder}/{name}" if folder else name) is not None


def list_output(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
    """Every file under OUT, by its path relative to OUT, with its details.

    Lists the literal prefix `root/` (fs.find): never a glob, since `[`, `*` and `?` in the user's OUT are
    plain characters, and never the bare prefix, which on object stores also matches `root-other/...`.
    """
    fs.invalidate_cache(root)  # another process (a worker, a concurrent run) may have written since
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    prefix = f"{root}/"
    files = {}
    for path, info in found.items():
        if path.endswith("/") or info.get("type") == "directory":  # a folder, or a store's folder marker (S3 consoles)
            continue
        if path == root:
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", root)
        if path.startswith(prefix):
            files[path[len(prefix):]] = info
    return files


def foreign_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Files under OUT that sdflow did not write, relative to OUT.

    Names alone do not prove a manifest.json or contact_sheet.png ours: a dataset's manifest says its
    format, and a contact sheet without one belongs to a run that committed shards (markers) and then died.
    """
    files = list_output(fs, root)
    foreign = sorted(name for name in files if not is_own(name) and not is_system_file(name))
    ours = "manifest.json" in files and _is_sdflow_manifest(fs.cat_file(f"{root}/manifest.json"))
    if "manifest.json" in files and not ours:
        foreign.append("manifest.json (not an sdflow manifest)")
    if "contact_sheet.png" in files and not ours and not any(n.startswith("_shards/") for n in files):
        foreign.append("contact_sheet.png")
    return foreign


# The dataset format this version writes. 2: row keys name the model by its content and cover guidance_rescale
# (which is a column), data files are per attempt. 3: clip_skip, a column and in the keys; every row has an
# image_index (a row may make many images), which enters its key; a run with LoRA has a loras column. A dataset of
# another format is not extended: its rows' keys would never match and its shards' columns would differ.
DATASET_FORMAT = "sdflow-dataset/3"


def check_format(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Refuse an existing sdflow dataset of another format than this version writes."""
    try:
        found = json.loads(fs.cat_file(f"{root}/manifest.json")).get("format")
    except FileNotFoundError:
        return
    if found != DATASET_FORMAT:
        raise StorageError(
            f"output {url} is a dataset of format {found}, written by another sdflow version; this one writes "
            f"{DATASET_FORMAT} (other row keys and columns: since format 3 each row has an image_index, which its "
            "key includes), so it cannot extend it, and shards of both would not load as one dataset: write to a new "
            "location. The old dataset stays readable as it is."
        )


# Files operating systems and tools leave in any folder a person opens (Finder, Windows Explorer, Jupyter, NFS's
# silly renames): neither sdflow's nor a sign of another dataset. Left alone: not refused, never deleted.
SYSTEM_FILE = re.compile(r"(?:.*/)?(?:\.DS_Store|\._.+|Thumbs\.db|desktop\.ini|\.nfs[0-9a-fA-F]+|\.ipynb_checkpoints/.*)")


def is_system_file(name: str) -> bool:
    return SYSTEM_FILE.fullmatch(name) is not None


def _is_sdflow_manifest(data: bytes) -> bool:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("sdflow-dataset/")


def check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Create and delete a probe file under OUT; raises StorageError naming the output if that fails.

    Locally the folders it needs are made for the probe and removed after it, so a run that stops later
    (a bad prompt table) still leaves no trace.
    """
    probe = f"{root}/.{PROBE}.{uuid.uuid4().hex}.tmp"
    try:
        if isinstance(fs, LocalFileSystem):
            made = []  # the folders this check creates, deepest first
            folder = root
            while folder and not os.path.lexists(folder):
                made.append(folder)
                folder = os.path.dirname(folder)
            try:
                os.makedirs(root, exist_ok=True)
                os.unlink(write_temporary(f"{root}/{PROBE}", b"probe"))
            finally:
                for folder in made:
                    try:
                        os.rmdir(folder)
                    except OSError:  # not ours to remove any more: another run wrote there meanwhile
                        pass
        else:
            fs.pipe_file(probe, b"probe")
            fs.rm_file(probe)
    except OSError as e:
        raise StorageError(f"output {url} cannot be written: {_reason(e)}.") from None


def _reason(e: OSError) -> str:
    """Why a write failed, in words a user can act on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or over quota); free space and run again, committed shards are kept"
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (a read-only folder or file system, or credentials that may not write there)"
    return f"{type(e).__name__}: {e}"


def write_temporary(path: str, data: bytes) -> str:
    """Write `data` to a hidden temporary file beside local `path`, fsynced; returns its path.

    A failed write (a full disk) removes its temporary file: nothing partial stays behind.
    """
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return temporary


# Local write errors that no retry can cure: they stop the run at once, named (nodes.errors.retry_transient).
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes, crash: str | None = None) -> None:
    """Write a whole file so that readers never see part of it.

    Locally: a hidden temporary file in the same folder, fsynced, then renamed over `path`. On object
    stores one PUT (or one completed multipart upload) is already all-or-nothing.
    """
    if isinstance(fs, LocalFileSystem):
        try:
            temporary = write_temporary(path, data)
        except OSError as e:
            if e.errno in PERMANENT_ERRNOS:
                raise StorageError(f"{path} cannot be written: {_reason(e)}.") from None
            raise
        if crash:
            crash_point(crash)
        os.replace(temporary, path)
    else:
        if crash:
            crash_point(crash)
        try:
            fs.pipe_file(path, data)
        except OSError as e:  # missing bucket, permission denied, a store error: name the file
            raise StorageError(f"{fs.unstrip_protocol(path)} cannot be written: {type(e).__name__}: {e}") from None


def parquet_bytes(table: pa.Table) -> bytes:
    """A whole Parquet file of `table`, in row groups of ROW_GROUP_ROWS."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def read_dataset_file(fs: fsspec.AbstractFileSystem, root: str, file: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file of a dataset (`file` relative to its root, as markers name it), or the named columns."""
    with fs.open(f"{root}/{file}", "rb") as f:
        return pq.read_table(f, columns=columns)


def decode_images(column: pa.ChunkedArray | pa.Array) -> list[Image.Image]:
    """The PIL images of an `image` column (structs of encoded bytes and path), lazily decoded."""
    return [Image.open(io.BytesIO(data)) for data in pa.chunked_array([column]).combine_chunks().field("bytes").to_pylist()]
