"""Tiny random Hugging Face models, saved with save_pretrained so the real loading path runs,
and a small generated dataset whose label needs both the image and the text."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, for the subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from mmtune.demo import make_dataset, vocabulary
from mmtune.logs import quiet_libraries

quiet_libraries()
# Two cores: one thread per process when pytest-xdist runs two workers, two otherwise.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(folder):
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    words = SPECIAL + vocabulary() + list("abcdefghijklmnopqrstuvwxyz0123456789.,:!?'")
    seen = []
    for w in words:
        if w not in seen:
            seen.append(w)
    vocab.write_text("\n".join(seen) + "\n")
    import inspect

    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{arg: str(vocab)}, do_lower_case=True)
    assert "[UNK]" not in tok.tokenize("works perfectly")
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(folder)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    torch.manual_seed(1)
    ViTModel(cfg).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("tiny-resnet")
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    torch.manual_seed(2)
    ResNetModel(cfg).save_pretrained(str(folder))
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = _tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(3)
    CLIPModel(cfg).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def colour_verdict(tmp_path_factory):
    """The demo task, small: 4 classes, image decides warm/cool, text decides keep/return."""
    folder = tmp_path_factory.mktemp("colour-verdict")
    return make_dataset(folder, n=240, image_size=32, seed=0)


def base_config(tmp_path, encoders, **extra):
    """A small fit's config. The evaluation's extras (report, explanations, linear probe, modality contribution) are
    off unless a test names them in ``evaluation=``: together they are about a third of a tiny fit's time, and the
    tests of each turn it on."""
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"id_column": "id"},
        "model": {"encoders": encoders, "fusion": {"hidden_dims": [32], "dropout": 0.0}},
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "trainer": {"max_epochs": 12, "batch_size": 16, "progress_bar": False, "early_stopping_patience": None,
                    "monitor": "val_acc"},
        "evaluation": {"report": False, "explain": 0, "linear_probe": False, "modality_contribution": False},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = tmp_path_factory.mktemp("tiny-wav2vec2")
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    Wav2Vec2Model(cfg).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    """One trained tiny image+text run (ViT + BERT, 2 epochs, the demo task's train and test tables in its config),
    shared by every test that only reads a bundle (prediction, serving and pruning): each copies or writes beside
    it, never into it."""
    import mmtune

    tmp = tmp_path_factory.mktemp("tiny-run")
    cfg = base_config(tmp, {"image": {"modality": "image", "checkpoint": tiny_vit},
                            "text": {"modality": "text", "checkpoint": tiny_bert}},
                      name="tiny", data={"train": str(colour_verdict["train"]), "test": str(colour_verdict["test"])},
                      trainer={"max_epochs": 2})
    return mmtune.fit(cfg)
