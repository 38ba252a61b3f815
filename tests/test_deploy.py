"""Shipping a bundle: ONNX export (fp32 parity, int8), the ONNX backend behind the same Predictor API, and
the HTTP server with every bad request it must turn away."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mmtune
from mmtune.cli import main as cli
from conftest import base_config

pytest.importorskip("onnxruntime")


def _rows(colour_verdict, split="test", n=None):
    df = pd.read_csv(colour_verdict[split])
    df["image"] = [str(Path(colour_verdict[split]).parent / p) for p in df["image"]]
    return df if n is None else df.head(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vit, tiny_bert, colour_verdict):
    """A tiny image+text run with cross-attention fusion trained with LoRA (adapters merged into the bundle),
    and its ONNX export (fp32 and int8), checked on the test rows."""
    tmp = tmp_path_factory.mktemp("deploy")
    enc = {"image": {"modality": "image", "checkpoint": tiny_vit}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp, enc, model={"fusion": {"type": "cross_attention", "width": 32, "heads": 2, "hidden_dims": [32]}},
                      finetune={"type": "lora", "r": 4}, trainer={"max_epochs": 3})
    cfg["data"].update(train=str(colour_verdict["train"]), test=str(colour_verdict["test"]))
    res = mmtune.fit(cfg)
    from mmtune.serving.export import export_onnx

    report = export_onnx(res.run_dir, data=str(colour_verdict["test"]), quantize="int8",
                                               log=lambda *_: None)
    return res, report


def test_onnx_export_computes_what_the_model_computes(exported, colour_verdict):
    res, report = exported
    rows = _rows(colour_verdict)
    torch_pred = mmtune.load(res.run_dir)
    onnx_pred = mmtune.load(res.run_dir, backend="onnx")
    assert onnx_pred.backend == "onnx" and onnx_pred.model is None
    assert report.max_abs_prob_diff <= 1e-4 and report.rows_checked == len(rows)
    ref = torch_pred.predict_proba(rows).drop(columns="id").to_numpy()
    for bs in (1, 5, None):  # dynamic batch axis; texts of different lengths: dynamic sequence axis
        got = onnx_pred.predict_proba(rows, batch_size=bs).drop(columns="id").to_numpy()
        assert np.abs(got - ref).max() <= 1e-4
    assert list(onnx_pred.predict(rows)) == list(torch_pred.predict(rows))
    for kind in torch_pred.embedding_kinds:
        a = torch_pred.embed(rows.head(9), kind).drop(columns="id").to_numpy()
        b = onnx_pred.embed(rows.head(9), kind).drop(columns="id").to_numpy()
        assert np.abs(a - b).max() <= 1e-4, kind
    m_t, m_o = torch_pred.evaluate(rows, contribution=True), onnx_pred.evaluate(rows, contribution=True)
    assert m_o["label"]["accuracy"] == m_t["label"]["accuracy"]
    assert m_o["modality_contribution"]["without image"]["metrics"] == m_t["modality_contribution"]["without image"]["metrics"]
    meta = json.loads((res.run_dir / "export" / "export.json").read_text())
    assert meta["inputs"] == ["image/pixel_values", "text/attention_mask", "text/input_ids", "text/token_type_ids",
                              "present/image", "present/text"]
    assert meta["outputs"] == ["proba/label", "fused", "pooled/image", "pooled/text"]
    assert not (res.run_dir / "export" / "model.safetensors").exists()  # the weights live in the graph only


def test_the_onnx_backend_reads_the_processors_without_building_the_encoders(exported, colour_verdict, monkeypatch):
    """An ONNX predictor takes each encoder's processor from its saved folder (building the encoders, even without
    weights, imported their model code: seconds at start-up); its batches are the PyTorch predictor's to the bit."""
    import mmtune.encoders as encoders
    import mmtune.models as models

    res, _ = exported
    rows = _rows(colour_verdict, n=12)
    torch_pred = mmtune.load(res.run_dir)

    def refuse(*a, **k):
        raise AssertionError("an ONNX predictor built an encoder")

    monkeypatch.setattr(encoders, "_build_encoder", refuse)
    monkeypatch.setattr(models, "model_for", refuse)
    onnx_pred = mmtune.load(res.run_dir, backend="onnx")
    a = next(iter(torch_pred.batches(torch_pred.dataset(rows, with_labels=False), 12)))
    b = next(iter(onnx_pred.batches(onnx_pred.dataset(rows, with_labels=False), 12)))
    assert sorted(a["inputs"]) == sorted(b["inputs"]) == ["image", "text"]
    for enc in a["inputs"]:
        assert sorted(a["inputs"][enc]) == sorted(b["inputs"][enc])
        for k, v in a["inputs"][enc].items():
            assert v.dtype == b["inputs"][enc][k].dtype and bool((v == b["inputs"][enc][k]).all()), (enc, k)


def test_a_saved_processor_reads_the_fields_its_encoder_reads(tmp_path, tiny_bert):
    """Shared weights over two text columns and one named field: the processor read back from the encoder's folder
    gives what the built encoder's processor gives."""
    from mmtune.config import EncoderConfig
    from mmtune.encoders import build_encoder, saved_processor

    columns = {"text": ["a red cup", "two"], "text.body": ["it is blue and quite large", ""]}
    for spec in (EncoderConfig(modality="text", checkpoint=tiny_bert, fields=["text", "text.body"]),
                 EncoderConfig(modality="text.body", checkpoint=tiny_bert, max_length=5)):
        enc = build_encoder(spec)
        folder = tmp_path / spec.modality
        enc.save_parts(folder)
        want, got = enc.processor(columns), saved_processor(spec, folder)(columns)
        assert got.keys() == want.keys() and len(want) >= 2
        assert all(bool((got[k] == want[k]).all()) for k in want)
    assert want["input_ids"].shape[1] == 5  # the named field, cut at its encoder's max_length


def test_int8_export_reports_its_accuracy_change(exported, colour_verdict):
    res, report = exported
    rows = _rows(colour_verdict)
    int8 = mmtune.load(res.run_dir / "export", backend="onnx-int8")
    fp32 = mmtune.load(res.run_dir / "export")
    acc = {name: p.evaluate(rows)["label"]["accuracy"] for name, p in (("int8", int8), ("fp32", fp32))}
    assert report.int8["metric_change"]["label"]["accuracy"] == pytest.approx(acc["int8"] - acc["fp32"], abs=1e-12)
    raw = {n: p.predict_proba(rows, calibrated=False).drop(columns="id").to_numpy() for n, p in (("int8", int8), ("fp32", fp32))}
    diff = np.abs(raw["int8"] - raw["fp32"]).max()
    assert 0 < diff == pytest.approx(report.int8["max_abs_prob_diff"], abs=1e-4)  # quantized: close, not equal
    assert diff < 0.1
    export = res.run_dir / "export"
    assert (export / "model.int8.onnx").stat().st_size < sum(f.stat().st_size for f in export.glob("model.onnx*"))


def test_several_batches_run_side_by_side_each_give_what_it_gives_alone(exported, colour_verdict):
    """With two threads, a call with several batches runs whole batches at once, one per thread of a second,
    one-thread session; each batch's probabilities are the ones it gets alone on the two-thread session, in its place
    (dynamic int8 too, whose activation ranges are measured per batch). Batches put back out of order, or split
    across the threads (dynamic int8 then measures other ranges), would differ by far more than the tolerance."""
    import threading

    from mmtune.serving.predictor import Batches
    from mmtune.serving.runners import ONNX_FILES, OnnxRunner

    res, _ = exported
    rows = _rows(colour_verdict)
    for backend in ("onnx", "onnx-int8"):
        pred = mmtune.load(res.run_dir / "export", backend=backend)
        runner = OnnxRunner(res.run_dir / "export" / ONNX_FILES[backend], pred.runner.output_modality,
                            torch.device("cpu"), threads=2)
        batches = list(pred.batches(pred.dataset(rows, with_labels=False), 7))
        alone = np.concatenate([runner.proba(pred.tasks, [b])["label"] for b in batches])
        assert runner._lanes is None  # a lone batch runs on the session's two threads
        together = runner.proba(pred.tasks, iter(batches))["label"]
        assert runner._lanes is not None and runner._lanes[0].get_session_options().intra_op_num_threads == 1
        assert len(batches) > 4 and together.shape == alone.shape
        assert np.abs(together - alone).max() <= 1e-6, backend
        assert np.abs(together[:-7] - alone[7:]).max() > 1e-3  # the check tells the batches apart
        # batches that say how many follow (the Predictor's): the first starts before the second is asked for
        started, run = threading.Event(), runner._run
        runner._run = lambda names, batch, session=None: (started.set(), run(names, batch, session))[1]

        def feed():
            yield batches[0]
            assert started.wait(10), "the second batch was asked for before the first one started"
            yield from batches[1:]

        assert np.abs(runner.proba(pred.tasks, Batches(feed(), len(batches)))["label"] - alone).max() <= 1e-6
        # one batch waits beyond those running: the third starts while the first is still running
        third = threading.Event()

        def first_waits(names, batch, session=None):
            if batch is batches[2]:
                third.set()
            assert batch is not batches[0] or third.wait(10), "the third batch waited for the first one"
            return run(names, batch, session)

        runner._run = first_waits
        assert np.abs(runner.proba(pred.tasks, iter(batches))["label"] - alone).max() <= 1e-6


def test_the_convolution_chain_is_whole_blocks(tmp_path):
    """Static int8 takes every convolution and the activations, sums and pools fed only by the chain (so a block stays
    int8 end to end), and nothing the chain does not feed: a Clip on the raw input, a matrix product."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmtune.serving.export import conv_chain

    w = lambda name, *shape: numpy_helper.from_array(np.ones(shape, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["x6"], name="clip_on_input"),
        helper.make_node("Conv", ["x6", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6_1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "a1"], ["r"], name="residual"),
        helper.make_node("Relu", ["r"], ["a2"], name="relu_2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="head"),
        helper.make_node("Add", ["m", "f2"], ["y"], name="add_outside"),  # f2 is a graph input, not the chain's
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
                                           helper.make_tensor_value_info("f2", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              [w("w1", 2, 2, 3, 3), w("w2", 2, 2, 3, 3), w("wm", 2, 2),
                               numpy_helper.from_array(np.array(0, np.float32), "lo"),
                               numpy_helper.from_array(np.array(6, np.float32), "hi")])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    assert conv_chain(tmp_path / "g.onnx") == ["conv1", "relu6_1", "conv2", "residual", "relu_2", "pool"]


def _attention_model(masks):
    """Self-attention layers over (batch, length, 16), 4 heads; ``masks`` per layer: ``rows`` (a mask row per query,
    as BERT's is), ``rows-keys-read`` (the same, its split keys also read elsewhere) or ``broadcast`` (one row for
    every query)."""
    import torch
    from torch import nn

    class Attentions(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.ModuleList(nn.Linear(16, 48) for _ in masks)

        def forward(self, x, mask):
            b, s, _ = x.shape
            keep = mask[:, None, None, :].bool()
            for layer, kind in zip(self.qkv, masks):
                q, k, v = (t.reshape(b, s, 4, -1).transpose(1, 2) for t in layer(x).chunk(3, dim=-1))
                m = keep if kind == "broadcast" else keep.expand(-1, 1, s, -1)
                out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, s, -1)
                x = x + out + (k.sum(dim=(1, 3))[..., None] if kind == "rows-keys-read" else 0)
            return x

    torch.manual_seed(0)
    return Attentions().eval()


def _exported_attention(model, path):
    import torch

    from mmtune.serving.export import dynamo_export

    x, mask = torch.randn(3, 5, 16), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=64)
    return dynamo_export(model, (x, mask), path, ["x", "mask"], ["y"], ({0: batch, 1: length}, {0: batch, 1: length}))


def _same_as_torch(model, session, tol=1e-5):
    import torch

    for b, s in ((3, 5), (2, 9)):  # other batch sizes and lengths than the export's
        feed = {"x": np.random.default_rng(b).normal(size=(b, s, 16)).astype(np.float32),
                "mask": (np.arange(s)[None] < np.array([s, s - 2, s - 1])[:b, None]).astype(np.int64)}
        want = model(torch.from_numpy(feed["x"]), torch.from_numpy(feed["mask"])).detach().numpy()
        got = session.run(None, feed)[0]
        assert np.abs(got - want).max() <= tol
        yield feed, got


def test_attention_heads_are_folded_into_the_attention_node(tmp_path, monkeypatch):
    """The heads' reshape/transpose around an opset-23 Attention node go into its 3-D form: the same outputs, four
    transposes fewer. An attention whose split keys are read elsewhere too keeps its 4-D form."""
    import onnx
    import onnxruntime as ort

    from mmtune.serving import export
    from mmtune.serving.export import ATTENTION_OPSET, fold_attention_heads

    if not export._opset():
        pytest.skip("this onnxruntime has no opset-23 Attention")
    model = _attention_model(["rows", "rows-keys-read"])
    assert _exported_attention(model, tmp_path / "folded.onnx") == ATTENTION_OPSET
    assert fold_attention_heads(tmp_path / "folded.onnx") == 0  # nothing left to fold
    with monkeypatch.context() as m:
        m.setattr(export, "fold_attention_heads", lambda path: 0)
        assert _exported_attention(model, tmp_path / "plain.onnx") == ATTENTION_OPSET
    folded, plain = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in ("folded", "plain"))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(plain, "Attention") == count(folded, "Attention") == 2
    assert count(folded, "Transpose") == count(plain, "Transpose") - 4
    heads = [[a.i for a in n.attribute if a.name.endswith("num_heads")] for n in folded.graph.node if n.op_type == "Attention"]
    assert sorted(heads) == [[], [4, 4]]
    a, b = (ort.InferenceSession(str(tmp_path / f"{n}.onnx"), providers=["CPUExecutionProvider"]) for n in ("folded", "plain"))
    for feed, got in _same_as_torch(model, a):
        assert np.abs(got - b.run(None, feed)[0]).max() <= 1e-6


def test_an_attention_onnxruntime_refuses_is_exported_without_the_attention_operator(tmp_path, monkeypatch):
    """A graph whose Attention nodes do not run in onnxruntime is written at the exporter's default opset instead
    (attention as matrix products) and computes what the model computes. onnxruntime 1.32 refuses a mask broadcast
    over the queries; whatever a later release does with it, the export must run and match."""
    import onnx
    import onnxruntime as ort

    from mmtune.serving import export

    model = _attention_model(["rows", "broadcast"])
    _exported_attention(model, tmp_path / "a.onnx")
    list(_same_as_torch(model, ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])))
    monkeypatch.setattr(export, "_runs_on_onnxruntime", lambda path, tensors: False)
    model = _attention_model(["rows"])
    assert _exported_attention(model, tmp_path / "b.onnx") is None
    assert not any(n.op_type == "Attention" for n in onnx.load(str(tmp_path / "b.onnx")).graph.node)
    list(_same_as_torch(model, ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, tiny_resnet, tiny_bert, colour_verdict):
    tmp = tmp_path_factory.mktemp("cnn")
    enc = {"image": {"modality": "image", "checkpoint": tiny_resnet}, "text": {"modality": "text", "checkpoint": tiny_bert}}
    cfg = base_config(tmp, enc, trainer={"max_epochs": 2},
                      data={"train": str(colour_verdict["train"]), "test": str(colour_verdict["test"])})
    return mmtune.fit(cfg)


def _op_types(path):
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_int8_convolutions_are_static_and_checked(cnn_run, colour_verdict, tmp_path, monkeypatch, capsys):
    """A CNN's int8 export: its convolution chains static int8 (QDQ, calibrated on the check rows) and kept when the main
    metric holds; the report's metric change and changed decisions are what the two models predict; a model that loses
    too much, unlabelled check rows and ``convolutions="float"`` keep them float, and say why."""
    from mmtune.serving import export as ex

    rows = _rows(colour_verdict)
    rep = ex.export_onnx(cnn_run.run_dir, tmp_path / "static", data=rows, quantize="int8", log=lambda *_: None)
    assert rep.int8["convolutions"] == "static" and rep.int8["calibration_rows"] == min(ex.CALIBRATION_ROWS, len(rows))
    ops = _op_types(tmp_path / "static" / "model.int8.onnx")
    convs = ops.count("Conv")
    assert convs == _op_types(tmp_path / "static" / "model.onnx").count("Conv") > 1
    assert ops.count("QuantizeLinear") >= convs and ops.count("DequantizeLinear") >= 2 * convs  # inputs and weights
    int8, fp32 = (mmtune.load(tmp_path / "static", backend=b) for b in ("onnx-int8", "onnx"))
    acc = {n: p.evaluate(rows)["label"]["accuracy"] for n, p in (("int8", int8), ("fp32", fp32))}
    assert rep.int8["metric_change"]["label"]["accuracy"] == pytest.approx(acc["int8"] - acc["fp32"], abs=1e-12)
    assert rep.int8["metric_change"]["label"]["accuracy"] >= -ex.INT8_METRIC_TOLERANCE
    flips = int((int8.predict_proba(rows, calibrated=False).drop(columns="id").to_numpy().argmax(1)
                 != fp32.predict_proba(rows, calibrated=False).drop(columns="id").to_numpy().argmax(1)).sum())
    assert rep.int8["decisions_changed"] == {"label": flips}
    assert json.loads((tmp_path / "static" / "export.json").read_text())["check"]["int8"]["convolutions"] == "static"

    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert cli(["export", "--run", str(cnn_run.run_dir), "--out", str(tmp_path / "float"), "--quantize", "int8",
                "--int8-convolutions", "float", "--data", str(tmp_path / "rows.csv")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("; convolutions float")
    assert json.loads((tmp_path / "float" / "export.json").read_text())["check"]["int8"]["convolutions"] == "float"
    assert "QuantizeLinear" not in _op_types(tmp_path / "float" / "model.int8.onnx")
    rep = ex.export_onnx(cnn_run.run_dir, tmp_path / "unlabelled", data=rows.drop(columns="label"), quantize="int8",
                         log=lambda *_: None)
    assert rep.int8["convolutions"] == "float" and "no labels" in rep.int8["convolutions_note"]
    monkeypatch.setattr(ex, "INT8_METRIC_TOLERANCE", -1.0)  # any static int8 model now loses too much
    said = []
    rep = ex.export_onnx(cnn_run.run_dir, tmp_path / "fallback", data=rows, quantize="int8", log=said.append)
    assert rep.int8["convolutions"] == "float" and "QuantizeLinear" not in _op_types(tmp_path / "fallback" / "model.int8.onnx")
    assert rep.int8["convolutions_note"].startswith("kept float: static int8 changed the main metric by")
    assert "convolutions float (kept float: static int8 changed" in said[-1]
    assert not list((tmp_path / "fallback").glob("*static-conv*"))  # the intermediate graph is not left behind
    with pytest.raises(ValueError, match="unknown int8 convolutions 'dynamic'; valid: static, float"):
        ex.export_onnx(cnn_run.run_dir, tmp_path / "bad", quantize="int8", convolutions="dynamic")


def test_export_cli_backends_and_refusals(exported, colour_verdict, tmp_path, capsys, monkeypatch):
    res, _ = exported
    rows = _rows(colour_verdict, n=10)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    out = tmp_path / "exp"
    # the default rows: the run's own validation split, rebuilt from its config
    assert cli(["export", "--run", str(res.run_dir), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"parity on {res.metrics['val']['label']['n']} rows" in said and "int8" not in said
    assert cli(["predict", "--run", str(out), "--data", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    ref = mmtune.load(res.run_dir).predict_table(rows)
    got = pd.read_csv(tmp_path / "p.csv")
    assert list(got["prediction"]) == list(ref["prediction"])
    assert cli(["predict", "--run", str(out), "--backend", "torch", "--data", str(tmp_path / "rows.csv"),
                "--out", str(tmp_path / "p.csv")]) == 2
    assert "is an ONNX export bundle (it has no PyTorch weights)" in capsys.readouterr().err
    assert cli(["predict", "--run", str(out), "--backend", "onnx-int8", "--data", str(tmp_path / "rows.csv"),
                "--out", str(tmp_path / "p.csv")]) == 2
    assert "has no onnx-int8 model" in capsys.readouterr().err
    before = (out / "export.json").read_text()
    from mmtune.serving import export as ex

    monkeypatch.setattr(ex, "PARITY_TOLERANCE", -1.0)  # any difference at all is now too much
    assert cli(["export", "--run", str(res.run_dir), "--out", str(out), "--data", str(tmp_path / "rows.csv")]) == 2
    assert "differ from the PyTorch model's" in capsys.readouterr().err
    assert (out / "export.json").read_text() == before  # the previous export is untouched
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".exp")]  # no half-written folder left
    other = tmp_path / "copy"
    shutil.copytree(res.run_dir, other, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(FileNotFoundError, match="has no ONNX export"):
        mmtune.load(other, backend="onnx")


# ---- the server ------------------------------------------------------------------------------------


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(exported):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmtune.serving.server import ServeSettings, create_app

    res, _ = exported
    settings = ServeSettings(max_request_rows=8, max_body_bytes=200_000, max_text_chars=200, max_pixels=100_000,
                             batch_window_ms=50.0)
    pred = mmtune.load(res.run_dir, backend="onnx")
    calls = []
    real = pred.proba_of
    pred.proba_of = lambda ds, *a, **k: (calls.append(len(ds)), real(ds, *a, **k))[1]
    with TestClient(create_app(pred, settings)) as c:
        c.calls = calls
        yield c


def test_server_predicts_what_the_predictor_predicts(client, exported, colour_verdict):
    res, _ = exported
    rows = _rows(colour_verdict, n=6)
    ref = mmtune.load(res.run_dir).predict_proba(rows)
    assert client.get("/health").json() == {"status": "ok"}
    meta = client.get("/metadata").json()
    assert meta["tasks"][0]["classes"] == [str(c) for c in mmtune.load(res.run_dir).class_names]
    assert meta["columns"]["files"] == ["image"] and meta["columns"]["text"] == ["text"]
    assert "/predict/batch" in client.get("/openapi.json").json()["paths"]
    body = {"id": rows["id"][0], "image": _b64(rows["image"][0]), "text": rows["text"][0]}
    one = client.post("/predict", json=body).json()
    assert one["id"] == rows["id"][0]
    probs = np.array([one["probabilities"][c] for c in ref.columns[1:]])
    assert np.abs(probs - ref.iloc[0, 1:].to_numpy(dtype=float)).max() <= 1e-4
    up = client.post("/predict", data={"text": rows["text"][0]},
                     files={"image": ("a.png", Path(rows["image"][0]).read_bytes(), "image/png")}).json()
    assert up["prediction"] == one["prediction"] and up["probabilities"] == pytest.approx(one["probabilities"], abs=1e-6)
    batch = client.post("/predict/batch", json={"rows": [{"image": _b64(p), "text": t} for p, t in zip(rows["image"], rows["text"])]})
    got = np.array([[r["probabilities"][c] for c in ref.columns[1:]] for r in batch.json()["predictions"]])
    assert np.abs(got - ref.iloc[:, 1:].to_numpy(dtype=float)).max() <= 1e-4
    emb = client.post("/embed", json={"rows": [{"image": _b64(rows["image"][0]), "text": rows["text"][0]}], "kind": "text"}).json()
    want = mmtune.load(res.run_dir).embed(rows.head(1), kind="text").drop(columns="id").to_numpy()[0]
    assert np.abs(np.array(emb["embeddings"][0]) - want).max() <= 1e-4


def test_concurrent_requests_are_micro_batched(client, colour_verdict):
    rows = _rows(colour_verdict, n=12)
    bodies = [{"image": _b64(p), "text": t} for p, t in zip(rows["image"], rows["text"])]
    alone = [client.post("/predict", json=b).json() for b in bodies]
    client.calls.clear()
    results = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def go(i):
        start.wait()
        results[i] = client.post("/predict", json=bodies[i]).json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(client.calls) == len(bodies) and len(client.calls) < len(bodies)  # fewer model calls than requests
    for a, b in zip(alone, results):  # each request gets its own row's answer back
        assert a["prediction"] == b["prediction"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


@pytest.mark.parametrize("body, status, said", [
    ({"image": "not base64!!", "text": "fine"}, 422, "row.image: not valid base64"),
    ({"image": base64.b64encode(b"GIF89a-broken").decode(), "text": "fine"}, 422, "row.image: not a readable image"),
    ({"image": base64.b64encode(_png((400, 400))).decode(), "text": "fine"}, 413, "row.image: image of 400×400 = 160000 pixels"),
    ({"image": "IMAGE", "text": "x" * 201}, 413, "row.text: 201 characters, more than the limit of 200"),
    ({"text": "no picture"}, 422, "missing image"),
    ({"image": "IMAGE", "text": 5}, 422, "row.text: expected a string, got int"),
    ({"image": "IMAGE", "text": "fine", "colour": "red"}, 422, "row: unknown column(s) 'colour'; this model reads image, text"),
    ({"image": {"path": "/etc/passwd"}, "text": "fine"}, 422, "row.image: file paths are not accepted by this server"),
    ([1, 2], 422, "row: expected a JSON object"),
])
def test_bad_requests_get_a_4xx_naming_the_field(client, colour_verdict, body, status, said):
    image = _b64(_rows(colour_verdict, n=1)["image"][0])
    if isinstance(body, dict):
        body = {k: (image if v == "IMAGE" else v) for k, v in body.items()}
    r = client.post("/predict", json=body)
    assert r.status_code == status and said in r.json()["detail"], r.text


def test_bad_bodies_and_batches(client, colour_verdict):
    row = {"image": _b64(_rows(colour_verdict, n=1)["image"][0]), "text": "fine"}
    r = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/predict/batch", json={"rows": [row] * 9})
    assert r.status_code == 413 and "9 rows, more than the limit of 8" in r.json()["detail"]
    r = client.post("/predict/batch", json={"rows": [row, {"image": "@@", "text": "x"}]})
    assert r.status_code == 422 and "rows[1].image: not valid base64" in r.json()["detail"]
    r = client.post("/predict", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than the limit of 200000" in r.json()["detail"]
    r = client.post("/predict", data={"text": "fine"}, files={"image": ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")})
    assert r.status_code == 422 and "row.image: not a readable image" in r.json()["detail"]
    r = client.post("/predict", data={"text": "fine"}, files={"image": ("a.png", b"", "image/png")})
    assert r.status_code == 422 and "row.image: empty file" in r.json()["detail"]
    r = client.post("/embed", json={"rows": [row], "kind": "audio"})
    assert r.status_code == 422 and "'audio' is not an embedding of this model; valid: fused, image, text" in r.json()["detail"]
    r = client.post("/predict/batch", json={"rows": []})
    assert r.status_code == 422 and "no rows" in r.json()["detail"]


def test_paths_only_under_the_allowed_folder(exported, colour_verdict, tmp_path):
    """--allow-paths DIR: files under DIR (symlinks resolved) decode with the same limits as uploads; anything
    else gets one answer whether or not it exists."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmtune.serving.server import ServeSettings, create_app

    res, _ = exported
    rows = _rows(colour_verdict, n=1)
    root = tmp_path / "allowed"
    root.mkdir()
    shutil.copy(rows["image"][0], root / "a.png")
    (root / "big.png").write_bytes(_png((500, 500)))
    (root / "escape.png").symlink_to(rows["image"][0])  # a link out of the folder
    outside = tmp_path / "secret.png"
    shutil.copy(rows["image"][0], outside)
    settings = ServeSettings(allow_paths=str(root), batching=False, max_pixels=100_000)
    ref = mmtune.load(res.run_dir).predict(rows)
    with TestClient(create_app(mmtune.load(res.run_dir), settings)) as c:
        for path in ("a.png", str(root / "a.png")):
            r = c.post("/predict", json={"image": {"path": path}, "text": rows["text"][0]})
            assert r.status_code == 200 and r.json()["prediction"] == ref[0], r.text
        answers = set()
        for path in (str(outside), "../secret.png", "escape.png", "/no/such.png", "nope.png", "/etc/passwd", "a.png\x00"):
            r = c.post("/predict", json={"image": {"path": path}, "text": "x"})
            assert r.status_code == 422, (path, r.text)
            answers.add(r.json()["detail"])
        assert answers == {"row.image: the path is not a file under the folder this server reads files from; give a "
                           "path under it (relative to it, or absolute)"}  # no existence oracle
        r = c.post("/predict", json={"image": {"path": "big.png"}, "text": "x"})
        assert r.status_code == 413 and "image of 500×500 = 250000 pixels" in r.json()["detail"]


def test_without_allow_paths_no_value_is_ever_a_path(client, colour_verdict):
    """A multipart form field (not an upload) for a file column is base64 text, as in JSON: never a path on the
    server, and the same answer for a file that exists and one that does not."""
    image = _rows(colour_verdict, n=1)["image"][0]
    said = set()
    for value in (image, "/no/such/file.png", "/etc/passwd"):
        for form in ({"files": {"text": (None, "works"), "image": (None, value)}},  # multipart, as curl -F sends
                     {"data": {"text": "works", "image": value}}):  # url-encoded
            r = client.post("/predict", **form)
            assert r.status_code == 422 and r.json()["detail"].startswith("row.image: not valid base64"), r.text
            said.add(r.json()["detail"])
        r = client.post("/predict", json={"text": "works", "image": {"path": value}})
        assert r.status_code == 422 and "file paths are not accepted by this server" in r.json()["detail"]
    assert len(said) == 1
    r = client.post("/predict", data={"text": "works", "image": _b64(image)})  # base64 in a form field works
    assert r.status_code == 200, r.text


def test_a_chunked_body_is_counted_as_it_arrives(client, colour_verdict):
    """No content-length (chunked transfer): the limit still holds, for JSON and for multipart bodies."""
    def chunks(total, piece=50_000):
        sent = 0
        while sent < total:
            yield b" " * min(piece, total - sent)
            sent += piece

    r = client.post("/predict", content=chunks(1_000_000), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 200000 bytes" in r.json()["detail"]

    def multipart():
        yield b"--XX\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        yield from chunks(1_000_000)
        yield b"\r\n--XX--\r\n"

    r = client.post("/predict", content=multipart(), headers={"content-type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 413 and "over the limit of 200000 bytes" in r.json()["detail"]


def test_pixels_are_bounded_per_request_and_per_micro_batch(exported):
    """Small files whose headers promise many pixels: refused before decoding once a request's images hold more
    than max_request_pixels together, each image under its own limit."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmtune.serving.server import MicroBatcher, ServeSettings, create_app

    res, _ = exported
    settings = ServeSettings(max_pixels=300_000, max_request_pixels=1_000_000, batching=False)
    big = base64.b64encode(_png((500, 500))).decode()  # 250,000 pixels in a few kB
    with TestClient(create_app(mmtune.load(res.run_dir, backend="onnx"), settings)) as c:
        r = c.post("/predict/batch", json={"rows": [{"image": big, "text": "x"}] * 4})
        assert r.status_code == 200, r.text
        r = c.post("/predict/batch", json={"rows": [{"image": big, "text": "x"}] * 5})
        assert r.status_code == 413 and "rows[4].image: the request's images hold 1250000 pixels together, more " \
            "than the limit of 1000000 per request" in r.json()["detail"]
    import asyncio

    import pandas as pd

    sizes = []
    batcher = MicroBatcher(lambda f: (sizes.append(len(f)), f["x"].tolist())[1], window=0.05, max_rows=64,
                           max_pixels=1_000)

    async def go():
        frames = [pd.DataFrame({"x": [i]}) for i in range(6)]
        out = await asyncio.gather(*(batcher.submit(f, 400) for f in frames))
        await batcher.close()
        return out

    assert asyncio.run(go()) == [[i] for i in range(6)]  # each request gets its own rows back
    assert sum(sizes) == 6 and max(sizes) == 2  # 400 + 400 fit in 1,000 pixels; a third would not


@pytest.mark.parametrize("body, said", [
    (b'{"text": "\\ud800", "image": null}', "row.text: not valid Unicode (a lone surrogate"),
    (b'{"text": "fine", "image": null, "id": "\\udfff"}', "row.id: not valid Unicode"),
    (b"[" * 100_000, "the body is not valid JSON (nested too deeply)"),
    (b'{"text": "a", "\\ud800": 1}', "row: unknown column(s) '\\ud800'"),
    (b"\xff\xfe{}", "the body is not valid JSON"),
])
def test_malformed_bodies_are_4xx_naming_the_field(client, body, said):
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and said in r.json()["detail"], r.text


def test_file_modalities_decode_uploaded_bytes_like_files(tmp_path, colour_verdict):
    """What the server does with an upload: the same decoded value as reading the file, and a reason for bad bytes."""
    from mmtune.modalities import Decoded, modality_of

    image = modality_of("image")
    path = _rows(colour_verdict, n=1)["image"][0]
    got = image.decode(Path(path).read_bytes(), name="row.image")
    assert isinstance(got, Decoded) and got.name == "row.image"
    assert np.array_equal(np.asarray(got.value), np.asarray(image.read(path, None)))
    assert image.check(got, None) is None and image.read(got, None) is got.value
    with pytest.raises(ValueError, match="not a readable image file"):
        image.decode(b"not an image")
    sf = pytest.importorskip("soundfile")
    audio = modality_of("audio")
    wave = (0.3 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    sf.write(tmp_path / "a.wav", wave, 8000)
    x, sr = audio.decode((tmp_path / "a.wav").read_bytes()).value
    ref, ref_sr = audio.read(str(tmp_path / "a.wav"), None)
    assert sr == ref_sr == 8000 and np.array_equal(x, ref)
    sf.write(tmp_path / "silent.wav", np.zeros(800, np.float32), 8000)
    with pytest.raises(ValueError, match="the recording is silent"):
        audio.decode((tmp_path / "silent.wav").read_bytes())
    with pytest.raises(ValueError, match="not a readable audio file"):
        audio.decode(b"RIFF....WAVEnope")


# ---- generated bodies (hypothesis) -----------------------------------------------------------------

from test_fuzz import FUZZ, scalar  # noqa: E402

st = pytest.importorskip("hypothesis.strategies")
# texts with lone surrogates too (JSON can carry them as \\ud800 escapes; UTF-8 cannot encode them)
wild_text = st.one_of(st.text(max_size=30), st.text(st.characters(codec=None, categories=["Cs", "Lu", "Zs"]), max_size=6))
json_values = st.recursive(st.one_of(scalar, wild_text), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@st.composite
def rows(draw, image: str, text: str):
    """A row that is almost right: the real columns (sometimes), each with a plausible or a wild value."""
    row = {}
    if draw(st.booleans()):
        row["image"] = draw(st.one_of(st.just(image), st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                                      st.sampled_from(["", "@@", "data:image/png;base64,", "/etc/passwd"]),
                                      st.dictionaries(st.sampled_from(["path", "x"]), st.text(max_size=10), max_size=2),
                                      json_values))
    if draw(st.booleans()):
        row["text"] = draw(st.one_of(st.just(text), wild_text, json_values))
    if draw(st.booleans()):
        row["id"] = draw(json_values)
    row.update(draw(st.dictionaries(wild_text, json_values, max_size=2)))
    return row


def test_the_server_answers_every_generated_body_with_a_4xx_naming_the_field_or_a_200(client, colour_verdict):
    """Random JSON shapes, random unicode, random bytes as images, wrong types, unknown columns and kinds: never a
    5xx, every 4xx names what was wrong, and memory does not grow with the bodies seen."""
    import psutil
    from hypothesis import given, strategies as st

    df = pd.read_csv(colour_verdict["test"]).head(1)
    image = base64.b64encode((Path(colour_verdict["test"]).parent / df["image"][0]).read_bytes()).decode()
    me = psutil.Process()
    seen = {"ok": 0, "bad": 0}
    endpoints = ["/predict", "/predict/batch", "/embed"]

    good = {"image": image, "text": df["text"][0]}

    @FUZZ
    @given(endpoint=st.sampled_from(endpoints), body=st.one_of(
        st.just(good), st.just({"rows": [good, good]}),
        rows(image, df["text"][0]),
        st.lists(rows(image, df["text"][0]), max_size=3).map(lambda r: {"rows": r}),
        st.tuples(st.lists(rows(image, df["text"][0]), max_size=2), json_values).map(lambda t: {"rows": t[0], "kind": t[1]}),
        json_values,
        st.integers(1, 200_000).map(lambda n: b"[" * n),  # nesting
        st.binary(max_size=60)))
    def check(endpoint, body):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = client.post(endpoint, content=content, headers={"content-type": "application/json"})
        assert r.status_code < 500, (endpoint, body, r.text)
        if r.status_code == 200:
            seen["ok"] += 1
            return
        seen["bad"] += 1
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail and "Traceback" not in detail
        assert any(w in detail for w in ("row", "body", "kind", "rows", "JSON", "expected")), detail

    check()
    rss = me.memory_info().rss
    check()  # the same examples again: what the server holds does not grow with what it has seen
    assert me.memory_info().rss - rss < 150 * 2 ** 20
    assert seen["bad"] > 0 and seen["ok"] > 0  # the generator reaches both answers
