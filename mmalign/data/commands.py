"""``mmalign data <generator>``: the dataset generators as subcommands."""

from mmalign.data.emoji import build_emoji_dataset
from mmalign.data.synthetic import build_synthetic_dataset
from mmalign.data.words import build_words_dataset

#: Subcommands of ``mmalign data``.
data = {"emoji": build_emoji_dataset, "synthetic": build_synthetic_dataset, "words": build_words_dataset}
