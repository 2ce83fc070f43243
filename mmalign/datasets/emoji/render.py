"""Emoji pictures: find the Noto Color Emoji font and render one emoji as a square RGB image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont



# NotoColorEmoji.ttf is a CBDT bitmap font with a single strike: 109 px is the only size it draws at.
FONT_SIZE = 109
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)
FONT_ENV = "MMALIGN_EMOJI_FONT"
_INSTALL_FONT = "install it with `apt-get install fonts-noto-color-emoji`"


def find_emoji_font(font_path: str | Path | None = None) -> Path:
    """Locate NotoColorEmoji.ttf: ``font_path``, then ``$MMALIGN_EMOJI_FONT``, then Debian's paths.

    Raises:
        FileNotFoundError: The font is not there, with the apt command that installs it.
    """
    explicit = font_path or os.environ.get(FONT_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"Emoji font {path} does not exist; {_INSTALL_FONT}.")
        return path
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "The Noto Color Emoji font (NotoColorEmoji.ttf) was not found in "
        f"{', '.join(FONT_CANDIDATES)}; {_INSTALL_FONT} (or set ${FONT_ENV} to its path)."
    )


class EmojiRenderer:
    """Draws emoji with a CBDT colour font; tells apart glyphs the font lacks.

    Args:
        font_path: NotoColorEmoji.ttf.
        image_size: Output side in pixels.
    """

    def __init__(self, font_path: str | Path, image_size: int) -> None:
        self.font = ImageFont.truetype(str(font_path), FONT_SIZE)
        self.image_size = image_size
        # A glyph cell is ~136 x 128 at 109 px; the canvas is 3 cells wide so that a sequence the font
        # cannot ligate shows up as several glyphs side by side instead of being cropped.
        self.cell = (136, 128)

    def render(self, emoji_str: str) -> tuple[Image.Image | None, str | None]:
        """Render ``emoji_str``.

        Returns:
            (RGB image on white, None), or (None, reason) when the font lacks it
            (``"not_in_font"``: blank or .notdef glyph; ``"multi_glyph"``: drawn as several glyphs).
        """
        width, height = self.cell
        canvas = Image.new("RGBA", (3 * width, height), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), emoji_str, font=self.font, embedded_color=True)
        alpha = np.asarray(canvas.getchannel("A"))  # [H, 3W]
        # Missing glyphs draw nothing in Noto Color Emoji (its .notdef is empty); a near-empty
        # drawing is treated the same.
        if (alpha > 32).sum() < 0.01 * width * height:
            return None, "not_in_font"
        box = canvas.getbbox()
        if box is None:
            return None, "not_in_font"
        if box[2] - box[0] > 1.5 * width:
            return None, "multi_glyph"
        glyph = canvas.crop((0, 0, width, height))
        background = Image.new("RGBA", glyph.size, (255, 255, 255, 255))
        square = Image.alpha_composite(background, glyph).convert("RGB")
        square = _pad_to_square(square)
        return square.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS), None


def _pad_to_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    out = Image.new("RGB", (side, side), (255, 255, 255))
    out.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return out


def valid_image(path: Path, image_size: int) -> bool:
    try:
        with Image.open(path) as image:
            return image.size == (image_size, image_size) and image.mode == "RGB"
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- speech
