"""One contract over every encoder kind: output shapes, out_dim, layer groups, gradients."""
import pytest
import torch
from PIL import Image

from mmtune.config import EncoderConfig
from mmtune.encoders import EncoderOutput, build_encoder

IMAGES = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 20), (10, 10, 200))]
TEXTS = ["works perfectly", "it broke after one day and I am sending it back"]


def _spec(request, kind):
    return {
        "bert": ("text", request.getfixturevalue("tiny_bert")),
        "vit": ("image", request.getfixturevalue("tiny_vit")),
        "resnet": ("image", request.getfixturevalue("tiny_resnet")),
        "clip": ("image_text", request.getfixturevalue("tiny_clip")),
        "clip-vision": ("image", request.getfixturevalue("tiny_clip")),
        "clip-text": ("text", request.getfixturevalue("tiny_clip")),
        "minilm-l6": ("text", "minilm-l6"),
        "efficientnet-lite0": ("image", "efficientnet-lite0"),
    }[kind]


KINDS = ["bert", "vit", "resnet", "clip", "clip-vision", "clip-text", "minilm-l6", "efficientnet-lite0"]


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_contract(request, kind):
    modality, ckpt = _spec(request, kind)
    enc = build_encoder(EncoderConfig(modality=modality, checkpoint=ckpt, image_size=64 if kind == "efficientnet-lite0" else None))
    cols = {"image": IMAGES, "text": TEXTS}
    inputs = enc.processor({m: cols[m] for m in enc.processor.modalities})
    out = enc(**inputs)
    outs = {"": out} if isinstance(out, EncoderOutput) else out
    assert set(outs) == set(enc.output_dims())
    for key, o in outs.items():
        assert o.pooled.shape == (2, enc.output_dims()[key])
        assert torch.isfinite(o.pooled).all()
        assert o.tokens is not None and o.tokens.shape[0] == 2 and o.tokens.dim() == 3
        if o.mask is not None:
            assert o.mask.shape == o.tokens.shape[:2] and o.mask.dtype == torch.bool
    if modality in ("text", "image_text"):
        text_out = outs.get("text", outs.get(""))
        assert text_out.mask is not None and text_out.mask[0].sum() < text_out.mask[1].sum()

    groups = enc.layer_groups()
    assert len(groups) >= 3
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)), "a parameter sits in two layer groups"
    assert set(ids) == {id(p) for p in enc.parameters()}, "layer groups must cover every parameter"

    # Gradients reach every trainable parameter of the encoder.
    loss = sum(o.pooled.pow(2).mean() for o in outs.values())
    loss.backward()
    missing = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None)]
    assert missing == []


@pytest.mark.parametrize("kind", ["bert", "vit", "clip", "clip-vision", "efficientnet-lite0"])
def test_rebuild_from_saved_parts_matches(request, tmp_path, kind):
    """An encoder rebuilt from its saved parts plus its weights gives the same outputs."""
    modality, ckpt = _spec(request, kind)
    spec = EncoderConfig(modality=modality, checkpoint=ckpt, image_size=64 if kind == "efficientnet-lite0" else None)
    enc = build_encoder(spec).eval()
    enc.save_parts(tmp_path / "enc")
    again = build_encoder(spec, bundle_dir=tmp_path / "enc").eval()
    again.load_state_dict(enc.state_dict())
    cols = {"image": IMAGES, "text": TEXTS}
    a_in = enc.processor({m: cols[m] for m in enc.processor.modalities})
    b_in = again.processor({m: cols[m] for m in again.processor.modalities})
    for k in a_in:
        assert torch.equal(a_in[k], b_in[k])
    with torch.no_grad():
        a, b = enc(**a_in), again(**b_in)
    a = {"": a} if isinstance(a, EncoderOutput) else a
    b = {"": b} if isinstance(b, EncoderOutput) else b
    for k in a:
        assert torch.allclose(a[k].pooled, b[k].pooled, atol=1e-6)


def test_wrong_modality_for_preset_is_clear():
    with pytest.raises(ValueError, match="preset 'minilm-l6' is a text encoder"):
        build_encoder(EncoderConfig(modality="image", checkpoint="minilm-l6"))
