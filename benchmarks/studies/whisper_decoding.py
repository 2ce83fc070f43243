"""How much does Whisper base's decoding limit the ASR-fused speech tower? Decoding variants on espeak-ng names.

    python -m benchmarks.studies.whisper_decoding --data data/emoji --split val --languages en,de,es,it --limit 80

The trimodal study (docs/results_trimodal_*.md) finds emergent speech->image close to speech->text R@1 x
text->image R@1: the ASR cascade's recognition of the spoken names caps it. This study decodes the first
``--limit`` clips of each language of one split (val by default: nothing here is chosen on test) with
:class:`~encoders.cascade.WhisperCascadeEncoder` (``packaged:whisper-base``, the fused overlay's settings: 3 s
silence margin, 48 new tokens, each clip in its row's language) and varies one thing at a time:

- ``greedy``: the shipped setting;
- ``beams=4``: beam search;
- ``n-best=4``: the same beam search's 4 hypotheses, their USE-m embeddings averaged by the softmax of their
  scores (``WhisperCascadeEncoder(num_hypotheses=4)``; same decode as ``beams=4``, whose transcript is its best);
- ``lead=0.3s`` / ``lead=0.6s``: that much silence before the clip (espeak-ng clips start at once; Whisper often
  drops the first phoneme: "Ruposan" for "grupo sanguíneo");
- ``collapse``: the greedy transcript with hallucinated loops (an n-gram repeated 3+ times in a row) cut to one.

Per variant and language: the cascade's speech->text R@1 (USE-m of the transcript against USE-m of that language's
names of the same clips, cosine), the exact-match rate of normalised transcripts, and the decode time relative to
greedy in the same run. Writes ``--doc`` (markdown) and ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmalign.captioning.metrics import normalize_transcript as normalise  # what WER/CER compare

VARIANTS = ("greedy", "beams=4", "n-best=4", "lead=0.3s", "lead=0.6s", "collapse")
DEFAULT_DOC = "docs/results_whisper_decoding.md"


def collapse_repeats(text: str, min_repeats: int = 3, max_n: int = 12) -> str:
    """``text`` with every run of ``min_repeats``+ consecutive repeats of one word n-gram (``n <= max_n``, compared
    without case and punctuation) cut to its first occurrence; a truncated repeat at the very end goes too."""
    words = text.split()
    key = [normalise(w) for w in words]
    out: list[str] = []
    i = 0
    while i < len(words):
        for n in range(1, min(max_n, len(words) - i) + 1):
            unit = key[i:i + n]
            k = 1
            while key[i + k * n:i + (k + 1) * n] == unit:
                k += 1
            if k >= min_repeats:
                out += words[i:i + n]
                j = i + n * k
                tail = " ".join(key[j:])
                if tail and " ".join(unit).startswith(tail):  # the loop cut off mid-repeat by the token limit
                    j = len(words)
                i = j
                break
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


def decode(encoder: Any, waves: Sequence[np.ndarray], lang: str, sampling_rate: int, lead: float = 0.0,
           batch_size: int = 8) -> list[str]:
    zeros = np.zeros(int(round(lead * sampling_rate)), np.float32)
    out: list[str] = []
    for i in range(0, len(waves), batch_size):
        chunk = [np.concatenate([zeros, w]) for w in waves[i:i + batch_size]]
        out += encoder.transcribe(chunk, sampling_rate=sampling_rate, languages=[lang] * len(chunk))
    return out


def n_best(encoder: Any, waves: Sequence[np.ndarray], lang: str, sampling_rate: int, batch_size: int = 8
           ) -> tuple[list[str], torch.Tensor]:
    """Best transcripts and the N-best embeddings (``encoder.num_hypotheses`` > 1) of ``waves``."""
    texts: list[str] = []
    embs: list[torch.Tensor] = []
    for i in range(0, len(waves), batch_size):
        inputs = encoder.preprocess(list(waves[i:i + batch_size]), sampling_rate=sampling_rate,
                                    languages=[lang] * len(waves[i:i + batch_size]))
        hyps, weights = encoder.decode_hypotheses(inputs)
        texts += [h[0] for h in hyps]
        embs.append(encoder.embed_hypotheses(hyps, weights))  # what the tower outputs, from the same decode
    return texts, torch.cat(embs)


def r1(encoder: Any, transcripts: Sequence[str], names: torch.Tensor, embeddings: torch.Tensor | None = None) -> float:
    """R@1 of each clip's transcript embedding (or the given ``embeddings``) against the names of all clips (clip
    i's name is the positive)."""
    e = encoder.embed_transcripts(list(transcripts)) if embeddings is None else embeddings
    hits = (torch.nn.functional.normalize(e, dim=-1) @ names.T).argmax(1) == torch.arange(len(transcripts))
    return float(hits.float().mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from encoders.audio import load_batch
    from encoders.cascade import WhisperCascadeEncoder

    torch.set_num_threads(args.threads)
    start = time.time()
    data = Path(args.data)
    rows = [json.loads(line) for line in (data / f"{args.split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    common = dict(pad_seconds=3.0, max_new_tokens=48, language="row")
    encoders = {1: WhisperCascadeEncoder(args.model, num_beams=1, **common),
                4: WhisperCascadeEncoder(args.model, num_beams=4, num_hypotheses=4, **common)}
    sr = encoders[1].sampling_rate
    results: dict[str, dict[str, dict[str, float]]] = {}
    examples: dict[str, list[tuple[str, str, str]]] = {}
    for lang in tqdm(args.languages, desc="languages"):
        chosen = [r for r in rows if r["lang"] == lang and r.get("audio")][: args.limit]
        if not chosen:
            raise ValueError(f"no {lang!r} clips in {data / (args.split + '.jsonl')}")
        waves = load_batch([str(data / r["audio"]) for r in chosen], sr)
        names = torch.nn.functional.normalize(encoders[1].embed_transcripts([r["text"] for r in chosen]), dim=-1)
        texts, seconds, embedded = {}, {}, {}
        for variant in VARIANTS:
            if variant == "collapse":
                texts[variant], seconds[variant] = [collapse_repeats(t) for t in texts["greedy"]], seconds["greedy"]
                continue
            if variant == "beams=4":  # the n-best decode's best hypotheses (the same beam search)
                continue
            t0 = time.perf_counter()
            if variant == "n-best=4":
                texts[variant], embedded[variant] = n_best(encoders[4], waves, lang, sr)
                texts["beams=4"] = texts[variant]
            else:
                lead = float(variant.split("=")[1].rstrip("s")) if variant.startswith("lead") else 0.0
                texts[variant] = decode(encoders[1], waves, lang, sr, lead=lead)
            seconds[variant] = time.perf_counter() - t0
        seconds["beams=4"] = seconds["n-best=4"]
        for variant in VARIANTS:
            results.setdefault(variant, {})[lang] = {
                "R@1": r1(encoders[1], texts[variant], names, embedded.get(variant)),
                "exact": float(np.mean([normalise(t) == normalise(r["text"]) for t, r in zip(texts[variant], chosen)])),
                "time_ratio": seconds[variant] / seconds["greedy"], "clips": len(chosen),
                "changed_by_collapse": sum(a != b for a, b in zip(texts["greedy"], texts["collapse"])),
            }
        examples[lang] = [(r["text"], texts["greedy"][i], texts["lead=0.3s"][i]) for i, r in enumerate(chosen[:4])]
    command = (f"python -m benchmarks.studies.whisper_decoding --data {args.data} --split {args.split} --languages "
               f"{','.join(args.languages)} --limit {args.limit}")
    result = {"command": command, "model": args.model, "results": results, "examples": examples,
              "seconds": round(time.time() - start)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    write_markdown(result, Path(args.doc))
    return result


def write_markdown(result: dict[str, Any], path: Path) -> None:
    langs = list(next(iter(result["results"].values())))
    res = result["results"]
    lines = ["# Whisper base decoding variants on espeak-ng names (issue 15)", "",
             "Generated by `benchmarks/studies/whisper_decoding.py`; do not edit by hand. Command:", "",
             f"    {result['command']}", "",
             "Cascade speech->text R@1 (USE-m of the transcript against USE-m of the same clips' names, "
             f"{res['greedy'][langs[0]]['clips']}-way per language) / exact-match rate of normalised transcripts / "
             "decode time relative to greedy in the same run. `collapse`: the greedy transcripts with repeated loops "
             "cut (no extra decoding; the count says how many transcripts it changed).", "",
             "| variant | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
    for variant, per_lang in res.items():
        cells = []
        for lang in langs:
            m = per_lang[lang]
            extra = f" ({m['changed_by_collapse']} changed)" if variant == "collapse" else f" / {m['time_ratio']:.1f}x"
            cells.append(f"{m['R@1']:.3f} / {m['exact']:.2f}{extra}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "First clips (name | greedy | 0.3 s lead):", ""]
    for lang, triples in result["examples"].items():
        cut = lambda t: t if len(t) <= 60 else t[:57] + "..."  # noqa: E731  (loops run to the token limit)
        lines += [f"- {lang}: " + "; ".join(f"{a} \\| {cut(b)} \\| {cut(c)}" for a, b, c in triples)]
    lines += ["", f"Run time {result['seconds']} s on 2 shared CPU cores ({result['model']}).", ""]
    from benchmarks.studies import write_report

    write_report(lines, path)  # a hand-written "## Reading" below the generated part survives regeneration


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--split", default="val")
    p.add_argument("--languages", type=lambda v: [x for x in v.split(",") if x], default=["en", "de", "es", "it"])
    p.add_argument("--limit", type=int, default=80, help="clips per language (the first ones of the split)")
    p.add_argument("--model", default="packaged:whisper-base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doc", default=DEFAULT_DOC)
    p.add_argument("--output", default="docs/results/whisper_decoding.json")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
