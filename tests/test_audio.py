"""Audio as a modality: decoding, resampling, cropping, bad recordings as bad rows, a Hugging Face audio
model loaded from a folder, the offline spectrogram encoder, and a label that needs audio and text."""
import random

import numpy as np
import pandas as pd
import pytest
import torch

import mmtune
from conftest import base_config
from mmtune.demo import make_audio_dataset, tone

sf = pytest.importorskip("soundfile")


@pytest.fixture(scope="session")
def tones(tmp_path_factory):
    return make_audio_dataset(tmp_path_factory.mktemp("tones"), n=240, seed=0, rate=22050)


def test_resampling_keeps_the_pitch_and_windows_are_centred(tmp_path):
    from mmtune.encoders.audio import WaveformProcessor
    from transformers import Wav2Vec2FeatureExtractor

    rate = 8000
    t = np.arange(int(rate * 3.0)) / rate
    x = np.where(t < 1.0, 0.0, np.sin(2 * np.pi * 440 * t)).astype("float32")  # silence, then 440 Hz
    proc = WaveformProcessor(Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False), max_seconds=1.0)
    out = proc({"audio": [(x, rate)]})["input_values"][0].numpy()
    assert out.shape == (16000,)  # resampled to the encoder's rate, the centre second of three
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) <= 2  # a real resampler: the pitch is kept


def test_training_crops_a_random_window_evaluation_the_centre(tiny_wav2vec2):
    from mmtune.config import load_config
    from mmtune.models import build_model
    from mmtune.modalities import MODALITIES

    cfg = load_config({"model": {"encoders": {"a": {"modality": "audio", "checkpoint": tiny_wav2vec2, "max_seconds": 0.5}}}})
    model = build_model(cfg.model, {"label": 2})
    crop = MODALITIES.get("audio").value_augment(None, model, seed=0)
    x = np.arange(16000 * 2, dtype="float32")
    starts = {int(crop((x, 16000))[0][0]) for _ in range(20)}
    assert len(starts) > 5 and all(len(crop((x, 16000))[0]) == 8000 for _ in range(3))
    assert crop((x[:4000], 16000))[0].shape == (4000,)  # a short one is left to the processor's padding


def test_bad_recordings_are_bad_rows(tmp_path, tiny_wav2vec2):
    good = tone(random.Random(0), "low", 16000, 0.5)
    sf.write(str(tmp_path / "good.wav"), good, 16000)
    sf.write(str(tmp_path / "silent.wav"), np.zeros(8000, dtype="float32"), 16000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype="float32"), 16000)
    (tmp_path / "text.wav").write_text("not audio")
    df = pd.DataFrame({"id": range(5), "audio": ["good.wav", "silent.wav", "empty.wav", "text.wav", "gone.wav"],
                       "label": ["a", "b", "a", "b", "a"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg = base_config(tmp_path, {"a": {"modality": "audio", "checkpoint": tiny_wav2vec2}}, trainer={"max_epochs": 1})
    with pytest.raises(mmtune.BadRowsError) as err:
        mmtune.fit(cfg, train=str(tmp_path / "t.csv"))
    reasons = {b.row: b.reason for b in err.value.bad_rows}
    assert set(reasons) == {2, 3, 4, 5}
    assert "is silent" in reasons[2] and "is empty (0 samples)" in reasons[3]
    assert "is not a readable recording" in reasons[4] and "does not exist" in reasons[5]


def test_a_hugging_face_audio_model_trains_and_reloads(tmp_path, tiny_wav2vec2, tiny_bert, tones):
    enc = {"audio": {"modality": "audio", "checkpoint": tiny_wav2vec2, "max_seconds": 0.5},
           "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp_path, enc, trainer={"max_epochs": 2}, finetune={"type": "partial"},
                      augment={"audio": {"enabled": True}}, evaluation={"report": False})
    res = mmtune.fit(cfg, train=str(tones["train"]))
    test = pd.read_csv(tones["test"]).head(16)
    test["audio"] = [str(tones["test"].parent / p) for p in test["audio"]]
    a = res.in_memory().predict_proba(test).drop(columns="id").to_numpy()
    b = mmtune.load(res.run_dir).predict_proba(test).drop(columns="id").to_numpy()
    assert np.abs(a - b).max() <= 1e-5
    # prediction decodes a recording once, when it is read: one that decodes to silence is named then
    sf.write(str(tmp_path / "silent.wav"), np.zeros(8000, dtype="float32"), 16000)
    silent = test.head(3).copy()
    silent.loc[1, "audio"] = str(tmp_path / "silent.wav")
    with pytest.raises(mmtune.BadRowsError, match=r"input row 2, column 'audio': audio file .*silent.wav.* is silent"):
        mmtune.load(res.run_dir).predict(silent)
    enc_model = res.model.encoders["audio"]
    assert [len(g) for g in enc_model.layer_groups()] and len(enc_model.layer_groups()) >= 3
    if pytest.importorskip("captum"):  # explanations over time: a strip of frames per recording, summing to 1
        expl = res.in_memory().explain(test.head(3), activation_rows=2)
        for cams in expl.cams:
            assert cams["audio"].shape[0] == 1 and cams["audio"].shape[1] > 1 and abs(cams["audio"].sum() - 1) < 1e-5
        assert {"audio", "text"} == set(expl.rows[0]["attribution_share"]) and expl.rows[0]["words"]["text"]
        assert any(k.startswith("audio/") for k in expl.activations["layers"])


def test_padding_frames_are_masked_out_of_the_pooled_vector(tiny_wav2vec2):
    from mmtune.config import load_config
    from mmtune.models import build_model

    cfg = load_config({"model": {"encoders": {"a": {"modality": "audio", "checkpoint": tiny_wav2vec2}}}})
    enc = build_model(cfg.model, {"label": 2}).encoders["a"].eval()
    x = tone(random.Random(1), "high", 16000, 0.5)
    out = enc(**enc.processor({"audio": [(x, 16000), (np.tile(x, 4), 16000)]}))
    real_frames = int(enc.model._get_feat_extract_output_lengths(torch.tensor(len(x))))
    assert out.mask[0].sum() == real_frames and out.mask[1].all()
    masked_mean = out.tokens[0, :real_frames].mean(0)
    assert torch.allclose(out.pooled[0], masked_mean, atol=1e-6)
    assert not torch.allclose(out.pooled[0], out.tokens[0].mean(0), atol=1e-3)  # the padding frames would differ


@pytest.mark.stochastic
def test_audio_and_text_together_find_a_label_neither_has_alone(tmp_path, tones):
    """The offline spectrogram encoder (ImageNet EfficientNet-Lite0 on log-mels), frozen and cached, plus
    MiniLM: the label is pitch x verdict."""
    enc = {"audio": {"modality": "audio", "checkpoint": "efficientnet-lite0-audio", "max_seconds": 2.0},
           "text": {"modality": "text", "checkpoint": "minilm-l6", "max_length": 32}}
    cfg = base_config(tmp_path, enc, finetune={"type": "frozen"}, trainer={"max_epochs": 20}, optim={"lr": 2e-3},
                      evaluation={"modality_contribution": True})
    res = mmtune.fit(cfg, train=str(tones["train"]), test=str(tones["test"]))
    m = res.metrics
    assert m["test"]["label"]["accuracy"] > 0.85
    # seeds 0-2 (and with ATEN_CPU_CAPABILITY=default alike): accuracy 0.95-0.967; hiding the audio costs
    # 0.32-0.42, hiding the text 0.57-0.63
    for hidden in ("without audio", "without text"):
        assert m["modality_contribution"][hidden]["change_vs_all"]["label"]["accuracy"] < -0.25
    test = pd.read_csv(tones["test"]).head(10)
    test["audio"] = [str(tones["test"].parent / p) for p in test["audio"]]
    a = res.in_memory().predict_proba(test).drop(columns="id").to_numpy()
    b = mmtune.load(res.run_dir).predict_proba(test).drop(columns="id").to_numpy()
    assert np.abs(a - b).max() <= 1e-5


def _tiny_audio_model(name):
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, HubertConfig, HubertModel,
                              Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel, WhisperConfig,
                              WhisperFeatureExtractor, WhisperModel)

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    conv = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    wave = Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True)
    if name == "hubert":
        return HubertModel(HubertConfig(**small, **conv)), wave
    if name == "wavlm":
        return WavLMModel(WavLMConfig(**small, **conv, num_buckets=32, max_bucket_distance=64)), wave
    if name == "ast":
        return ASTModel(ASTConfig(**small, max_length=100, num_mel_bins=128, frequency_stride=10, time_stride=10)), \
            ASTFeatureExtractor(max_length=100)
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                                      max_source_positions=1500, vocab_size=100, **tokens)), WhisperFeatureExtractor()


@pytest.mark.parametrize("name", ["hubert", "wavlm", "ast", "whisper"])
def test_other_hugging_face_audio_families_load_pool_and_reload(tmp_path, name):
    from safetensors.torch import load_model, save_model

    from mmtune.config import load_config
    from mmtune.encoders import build_encoder

    torch.manual_seed(0)
    model, fe = _tiny_audio_model(name)
    model.save_pretrained(str(tmp_path / "ckpt"))
    fe.save_pretrained(str(tmp_path / "ckpt"))
    spec = load_config({"model": {"encoders": {"a": {"modality": "audio", "checkpoint": str(tmp_path / "ckpt"),
                                                     "max_seconds": 1.0}}}}).model.encoders["a"]
    enc = build_encoder(spec).eval()
    x = tone(random.Random(2), "low", 16000, 0.75)
    inputs = enc.processor({"audio": [(x, 16000), (x[:4000], 16000)]})
    out = enc(**inputs)
    assert out.pooled.shape == (2, 32) and torch.isfinite(out.pooled).all()
    if out.mask is not None:  # padding frames masked: the short clip has fewer real frames
        assert out.mask[1].sum() < out.mask[0].sum()
    assert len(enc.layer_groups()) >= 3  # embeddings, then a group per layer: partial / gradual / layer decay work
    # rebuilt from its saved parts (what a bundle holds) with the same weights: the same outputs
    enc.save_parts(tmp_path / "parts")
    save_model(enc, str(tmp_path / "w.safetensors"))
    again = build_encoder(spec, tmp_path / "parts")
    load_model(again, str(tmp_path / "w.safetensors"))
    assert torch.allclose(again.eval()(**again.processor({"audio": [(x, 16000)]})).pooled, out.pooled[:1], atol=1e-5)


def test_the_speaker_encoder_architecture_and_its_features():
    """The resemblyzer speaker encoder as written here (random weights; its real weights are read from the
    installed package when there is one): partial utterances of 1.6 s at half overlap, padding partials
    masked, unit-length embeddings, a layer group per LSTM layer."""
    from mmtune.encoders.speaker import SpeakerEncoder, slaney_mel_filterbank

    fb = slaney_mel_filterbank()
    assert fb.shape == (40, 201) and (fb >= 0).all()
    # unit area in Hz: each filter's weights times the bin spacing (40 Hz) sum to the triangle's area, 1
    assert np.allclose(fb.sum(1) * 40.0, 1.0, atol=0.15)
    torch.manual_seed(0)
    enc = SpeakerEncoder(weights=False, max_seconds=3.0).eval()
    long, short = tone(random.Random(0), "low", 16000, 2.5), tone(random.Random(1), "high", 8000, 1.0)
    inputs = enc.processor({"audio": [(long, 16000), (short, 8000)]})
    assert inputs["mels"].shape[2:] == (160, 40)
    assert inputs["partials"].sum(1).tolist() == [3, 1]  # 250 frames: windows at 0, 80, 160; 100 frames: one
    out = enc(**inputs)
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(2), atol=1e-5)
    alone = enc(**enc.processor({"audio": [(short, 8000)]})).pooled
    assert torch.allclose(alone, out.pooled[1:], atol=1e-5)  # a longer neighbour's partials change nothing
    assert [len(g) for g in enc.layer_groups()] == [4, 4, 4, 2]


def test_the_speaker_encoder_names_what_it_needs(monkeypatch):
    import importlib.util

    from mmtune.encoders.speaker import weights_path
    from mmtune.extras import MissingExtraError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match="pip install --no-deps resemblyzer"):
        weights_path()


def test_lora_finds_the_attention_projections_of_an_audio_model(tiny_wav2vec2):
    from mmtune.config import load_config
    from mmtune.finetune import build_strategy
    from mmtune.models import build_model

    cfg = load_config({"model": {"encoders": {"a": {"modality": "audio", "checkpoint": tiny_wav2vec2}}},
                       "finetune": {"type": "lora", "r": 2}})
    model = build_model(cfg.model, {"label": 2})
    strategy = build_strategy(cfg.finetune)
    strategy.prepare(model)
    strategy.apply(model)
    trainable = [n for n, p in model.encoders.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
