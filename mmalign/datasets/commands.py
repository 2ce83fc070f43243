"""``mmalign data <generator>``: the dataset generators as subcommands."""

from mmalign.datasets.corpus import build_corpus
from mmalign.datasets.emoji import build_emoji_dataset
from mmalign.datasets.robust import build_robust_dataset
from mmalign.datasets.synthetic import build_synthetic_dataset
from mmalign.datasets.words import build_words_dataset

#: Subcommands of ``mmalign data``.
data = {"corpus": build_corpus, "emoji": build_emoji_dataset, "robust": build_robust_dataset,
        "synthetic": build_synthetic_dataset, "words": build_words_dataset}
