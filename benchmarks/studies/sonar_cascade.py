"""How far is a trained speech projector from an ASR cascade? (issue 9) On the sonar_window.py subset.

Same 200-concept subset and 140 / 60 concept split as ``benchmarks/studies/sonar_window.py`` (en/de/es espeak
speech of emoji names). Three ways to put a clip into the USE-m text space, scored by speech(L) -> text(L)
R@1 over the 60 held-out concepts (60-way, chance 0.017):

* **cascade** (no training): Whisper base transcribes the clip (greedy, language token given, 30 s
  window), and the frozen USE-m embeds the transcript. This is not a projector recipe; it shows what
  Whisper's decoder knows that its pooled encoder states do not.
* **projector**: the SONAR recipe's head (``configs/offline/sonar_speech.yaml``: BatchNorm MLP, dropout
  0.5, InfoNCE with masked false negatives + MSE) on mean-pooled 30 s-window encoder states, trained
  on the 140 training concepts; mean over ``--seeds``.
* **projector on [encoder states, cascade embedding]**: the same head on both, concatenated.

Usage (repo root): ``python -m benchmarks.studies.sonar_cascade`` (features cached as ``.npy`` under ``--cache``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.studies.sonar_window import LANGS, encode_text, per_lang_r1, subset_parser, subset_setup  # noqa: E402


@torch.inference_mode()
def transcribe(rows: list[dict], root: Path, out: Path, max_tokens: int = 24) -> tuple[list[str], np.ndarray, float]:
    """Greedy Whisper base transcripts and the mean-pooled encoder states of ``rows`` (cached at ``out``)."""
    if out.with_suffix(".json").exists() and out.with_suffix(".npy").exists():
        return json.loads(out.with_suffix(".json").read_text()), np.load(out.with_suffix(".npy")), 0.0
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration

    from encoders import WhisperSpeechEncoder
    from encoders.tiny import resolve_model_path

    enc = WhisperSpeechEncoder("packaged:whisper-base", pooling="mean", pad_to_30s=True, dtype="bfloat16")
    path = Path(resolve_model_path("packaged:whisper-base"))
    decoder = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    tok = Tokenizer.from_file(str(path / "ct2_tokenizer.json"))  # written by `mmalign convert`
    special = {t: tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>")}
    texts, pooled, start = [], [], time.perf_counter()
    for i in range(0, len(rows), 8):
        batch = rows[i : i + 8]
        o = enc.encode(enc.preprocess([str(root / r["audio"]) for r in batch]))
        pooled.append(o.pooled.float().numpy())
        for j, r in enumerate(batch):
            prompt = [special["<|startoftranscript|>"], tok.token_to_id(f"<|{r['lang']}|>"), special["<|transcribe|>"],
                      special["<|notimestamps|>"]]
            ids, cache, step = list(prompt), None, torch.tensor([prompt])
            for _ in range(max_tokens):
                d = decoder.model.decoder(input_ids=step, encoder_hidden_states=o.tokens[j : j + 1], past_key_values=cache, use_cache=True)
                cache = d.past_key_values
                nxt = int(decoder.proj_out(d.last_hidden_state[:, -1]).argmax(-1))
                if nxt == special["<|endoftext|>"]:
                    break
                ids.append(nxt)
                step = torch.tensor([[nxt]])
            texts.append(tok.decode(ids[len(prompt):]).strip())
        if (i // 8) % 10 == 0:
            print(f"  {i + len(batch)}/{len(rows)} clips, {time.perf_counter() - start:.0f} s; e.g. {batch[0]['text']!r} -> {texts[i]!r}", flush=True)
    x = np.concatenate(pooled)
    out.with_suffix(".json").write_text(json.dumps(texts, ensure_ascii=False))
    np.save(out.with_suffix(".npy"), x)
    return texts, x, time.perf_counter() - start


def train_head(x: torch.Tensor, y: torch.Tensor, concepts: list[str], seed: int, epochs: int = 60, batch: int = 128):
    """The SONAR recipe's head and losses on ``x -> y``; returns ``f(x) -> embeddings``."""
    from encoders.base import EncoderOutput
    from mmalign.training.losses import ClipLoss, MSELoss, group_ids
    from projectors import MLP

    torch.manual_seed(seed)
    head = MLP(x.shape[1], y.shape[1], hidden_dim=1024, num_blocks=0, dropout=0.5, norm="batch")
    clip, mse = ClipLoss(gather=False, false_negatives="mask"), MSELoss()
    groups = group_ids(concepts)
    opt = torch.optim.AdamW([*head.parameters(), *clip.parameters()], lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            z = head(EncoderOutput(pooled=x[idx]))
            loss = clip(z, y[idx], groups[idx])["clip_loss"] + mse(z, y[idx])["mse_loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return lambda t: head(EncoderOutput(pooled=t)).detach()


def main() -> None:
    args, root, cache, rows, te = subset_setup(subset_parser(__doc__.splitlines()[0]))
    test_rows = [r for r, t in zip(rows, te) if t]

    y = encode_text(rows, cache / f"use_m_{args.concepts}c.npy")
    texts, x_enc, secs = transcribe(rows, root, cache / f"whisper_base_asr_bf16_{args.concepts}c")
    from encoders import UniversalSentenceEncoderM

    use = UniversalSentenceEncoderM(threads=args.threads)
    with torch.inference_mode():
        x_asr = use.encode(use.preprocess([t or "-" for t in texts])).pooled.float().numpy()  # empty transcript -> "-"
    exact = {lang: float(np.mean([t.lower().strip(" .!?") == r["text"].lower() for t, r in zip(texts, rows) if r["lang"] == lang])) for lang in LANGS}
    results: dict = {"clips": len(rows), "test_concepts": len(test_rows) // len(LANGS), "transcribe_s": round(secs, 1), "exact_transcripts": exact}
    results["cascade (ASR -> USE-m, no training)"] = per_lang_r1(x_asr[te], y[te], test_rows)
    tr = ~te
    train_concepts = [r["concept"] for r, t in zip(rows, tr) if t]
    for label, x in [("projector (encoder states)", x_enc), ("projector ([encoder states, cascade])", np.concatenate([x_enc, x_asr], 1))]:
        xt, yt = torch.as_tensor(x).float(), torch.as_tensor(y).float()
        runs = [per_lang_r1(train_head(xt[tr], yt[tr], train_concepts, s)(xt[te]).numpy(), y[te], test_rows) for s in range(args.seeds)]
        results[label] = {lang: float(np.mean([r[lang] for r in runs])) for lang in LANGS}
    for k, v in results.items():
        if isinstance(v, dict) and k != "exact_transcripts":
            print(f"{k:42s} " + " ".join(f"{lang} {100 * s:5.1f}" for lang, s in v.items()) + f" | mean {100 * np.mean(list(v.values())):.1f}")
    print("exact transcripts:", {k: round(v, 3) for k, v in exact.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
