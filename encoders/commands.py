"""``mmalign convert <format>``: turn packaged or foreign weights into standard model directories."""

from encoders.convert_ct2 import convert_ct2_whisper, packaged_whisper_base, packaged_whisper_tiny_en
from encoders.timm_image import convert_efficientnet_lite0

#: Subcommands of ``mmalign convert``.
convert = {
    "ct2-whisper": convert_ct2_whisper,
    "packaged-whisper-base": packaged_whisper_base,
    "packaged-whisper-tiny-en": packaged_whisper_tiny_en,
    "efficientnet-lite0": convert_efficientnet_lite0,
}
