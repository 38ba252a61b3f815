"""Matching and retrieval: two towers trained to agree, ranking metrics against references, a search index,
and the consistency check of a table's pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mmtune
from mmtune.demo import make_pairs
from mmtune.evaluation.ranking import first_relevant_rank, ndcg_at, retrieval_metrics, roc_auc
from mmtune.losses.contrastive import info_nce

from conftest import base_config


# ---- metrics and loss against references -------------------------------------------------------------------
def test_ranking_metrics_equal_a_loop_and_scikit_learn():
    from sklearn.metrics import ndcg_score, roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 25))
    relevant = rng.random((40, 25)) < 0.08
    relevant[np.arange(40), rng.integers(0, 25, 40)] = True  # every query has a relevant candidate
    ranks = first_relevant_rank(scores, relevant)
    for i in range(40):  # the loop: position of the first relevant candidate in the sorted list
        order = np.argsort(-scores[i])
        assert ranks[i] == 1 + next(p for p, j in enumerate(order) if relevant[i, j])
    m = retrieval_metrics(scores, relevant)
    assert m["recall@1"] == pytest.approx(np.mean(ranks <= 1), abs=1e-12)
    assert m["recall@5"] == pytest.approx(np.mean(ranks <= 5), abs=1e-12)
    assert m["mrr"] == pytest.approx(np.mean(1.0 / ranks), abs=1e-12)
    assert m["ndcg@10"] == pytest.approx(ndcg_score(relevant.astype(int), scores, k=10), abs=1e-9)
    assert np.allclose(ndcg_at(scores, relevant, 25), [ndcg_score(relevant[i:i + 1].astype(int), scores[i:i + 1])
                                                       for i in range(40)], atol=1e-9)
    label, score = rng.random(200) < 0.3, rng.normal(size=200).round(1)  # rounded: ties are averaged
    assert roc_auc(score, label) == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    assert roc_auc(score, np.ones(200)) is None


def test_info_nce_is_the_mean_of_both_directions_cross_entropy_and_skips_negative_anchors():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    r = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    scale = torch.tensor(10.0)
    s = (scale * q @ r.T).double()
    expected = [0.5 * (-torch.log_softmax(s[i], 0)[i] - torch.log_softmax(s[:, i], 0)[i]) for i in range(5)]
    got = info_nce(q, r, scale)
    assert torch.allclose(got.double(), torch.stack(expected), atol=1e-5)
    masked = info_nce(q, r, scale, positive=torch.tensor([1, 0, 1, 1, 0]))
    assert masked[1] == 0 and masked[4] == 0 and torch.allclose(masked[[0, 2, 3]], got[[0, 2, 3]])


def _table(path):
    """A manifest as a DataFrame, its image paths made absolute (a DataFrame has no folder to resolve them in)."""
    df = pd.read_csv(path)
    return df.assign(image=[str(path.parent / p) for p in df["image"]])


# ---- a fitted matcher ------------------------------------------------------------------------------------------
def _matcher_config(tmp_path, tiny_vit, tiny_bert, tables, **extra):
    cfg = base_config(tmp_path, {"image": {"modality": "image", "checkpoint": tiny_vit},
                                 "text": {"modality": "text", "checkpoint": tiny_bert}},
                      data={"train": str(tables["train"]), "test": str(tables["test"]), "query": "image",
                            "response": "text"},
                      matching={"dim": 32}, trainer={"max_epochs": 10, "monitor": "val_loss", "batch_size": 32},
                      evaluation={"report": False})
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), n=320, image_size=32, seed=0)


@pytest.fixture(scope="module")
def matcher(tmp_path_factory, tiny_vit, tiny_bert, pairs):
    tmp = tmp_path_factory.mktemp("matcher")
    return mmtune.fit(_matcher_config(tmp, tiny_vit, tiny_bert, pairs))


@pytest.mark.stochastic
def test_a_matcher_learns_a_planted_pairing_the_untrained_towers_do_not_know(matcher, pairs):
    from mmtune.config import load_config
    from mmtune.data.datamodule import TableDataModule
    from mmtune.evaluation.matching import evaluate_matching
    from mmtune.models import model_for

    test = matcher.metrics["test"]
    assert test["candidates"] == 8 and test["queries"] == 80
    # the same towers before training (pretrained encoders, fresh projections) on the same test rows
    cfg = load_config(matcher.config.to_dict())
    torch.manual_seed(0)
    untrained = model_for(cfg, [])
    data = TableDataModule(cfg).read()
    from mmtune.finetune import build_strategy

    data.attach(untrained, build_strategy(cfg.finetune))
    before, _ = evaluate_matching(untrained, {"test": data.eval_loader("test")}, data.prepared.frames, cfg.data,
                                  {"test": {}})
    assert before["test"]["recall@1"] < 0.35  # chance is 1/8
    assert test["recall@1"] >= 0.6 and test["recall@1"] > before["test"]["recall@1"] + 0.3
    assert test["mrr"] >= test["recall@1"] and test["recall@5"] >= test["recall@1"]


def test_a_reloaded_matcher_embeds_scores_and_searches_as_in_memory(matcher, pairs, tmp_path):
    from mmtune.serving.matching import MatchPredictor, SearchIndex

    pred = mmtune.load(matcher.run_dir)
    assert isinstance(pred, MatchPredictor)
    test = _table(pairs["test"])
    saved = pd.read_csv(matcher.run_dir / "predictions" / "test.csv")
    scores = pred.score_pairs(test)
    assert np.allclose(scores["score"].to_numpy(), saved["score"].to_numpy(), atol=1e-5)  # the bundle's own numbers
    q, r = pred.embed(test, side="query"), pred.embed(test, side="response")
    assert q.shape == (80, 32) and np.allclose(np.linalg.norm(q.to_numpy(), axis=1), 1, atol=1e-5)
    corpus = test.drop_duplicates("text").reset_index(drop=True)
    hits = pred.search(test, corpus, top_k=3)
    brute = q.to_numpy() @ pred.embed(corpus, side="response").to_numpy().T
    top = np.argsort(-brute, axis=1, kind="stable")[:, :3]
    assert hits["id"].tolist() == [str(corpus["id"][j]) for j in top.ravel()]
    assert np.allclose(hits["score"].to_numpy(), np.take_along_axis(brute, top, 1).ravel(), atol=1e-5)
    index = pred.index(corpus)
    again = SearchIndex.load(index.save(tmp_path / "ix"))
    assert again.search(q.to_numpy(), 3).equals(index.search(q.to_numpy(), 3))
    (tmp_path / "ix" / "index.npy").write_bytes(b"\x80\x04not an array")  # a planted file is refused, never run
    with pytest.raises(ValueError, match="damaged"):
        SearchIndex.load(tmp_path / "ix")
    with pytest.raises(ValueError, match="side must be one of"):
        pred.embed(test, side="left")
    with pytest.raises(mmtune.BadRowsError):
        pred.embed(test.assign(image="missing.png"), side="query")
    # a picture that only fails when it is decoded (the side's rows are decoded once, when read): still every row named
    cut = tmp_path / "cut.png"
    whole = Path(test["image"][0]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    bad = test.copy()
    bad.loc[[2, 5], "image"] = str(cut)
    with pytest.raises(mmtune.BadRowsError) as err:
        pred.embed(bad, side="query")
    assert [(b.split, b.row) for b in err.value.bad_rows] == [("query", 3), ("query", 6)]
    assert all("not a readable image" in b.reason for b in err.value.bad_rows)


@pytest.mark.stochastic
def test_the_consistency_check_puts_swapped_pairs_first(matcher, pairs):
    pred = mmtune.load(matcher.run_dir)
    test = _table(pairs["test"])
    rng = np.random.default_rng(0)
    swapped = rng.choice(len(test), 8, replace=False)
    words = test["text"].to_numpy().copy()
    for i in swapped:  # another colour's name
        words[i] = next(w for w in np.roll(sorted(set(words)), 1) if w != words[i])
    table = test.assign(text=words)
    out = pred.check_pairs(table)
    assert list(out.columns[:3]) == ["row", "id", "score"] and len(out) == len(table)
    first = set(out["row"][:8])  # the top decile of 80 rows
    assert len(first & set(swapped)) >= 6


def test_matching_cli_searches_and_checks_pairs(matcher, pairs, tmp_path):
    from mmtune.cli import main

    out = tmp_path / "hits.csv"
    assert main(["search", "--run", str(matcher.run_dir), "--corpus", str(pairs["test"]), "--queries",
                 str(pairs["test"]), "--top-k", "2", "--out", str(out), "--save-index", str(tmp_path / "ix")]) == 0
    hits = pd.read_csv(out)
    assert len(hits) == 160 and set(hits["rank"]) == {1, 2}
    assert main(["search", "--run", str(matcher.run_dir), "--index", str(tmp_path / "ix"), "--queries",
                 str(pairs["test"]), "--top-k", "2", "--out", str(tmp_path / "again.csv")]) == 0
    assert pd.read_csv(tmp_path / "again.csv").equals(hits)
    page = tmp_path / "pairs.html"
    assert main(["check-pairs", "--run", str(matcher.run_dir), "--data", str(pairs["test"]), "--out",
                 str(tmp_path / "pairs.csv"), "--html", str(page)]) == 0
    assert len(pd.read_csv(tmp_path / "pairs.csv")) == 80 and "<img" in page.read_text()


@pytest.mark.stochastic
def test_frozen_towers_train_only_the_projections_on_the_cache_with_hard_negatives(tmp_path, tiny_vit, tiny_bert, pairs):
    cfg = _matcher_config(tmp_path, tiny_vit, tiny_bert, pairs, finetune={"type": "frozen"},
                          trainer={"max_epochs": 3}, data={"match_label": None}, matching={"hard_negatives": 4})
    res = mmtune.fit(cfg)
    fresh = mmtune.load(res.run_dir).model
    from transformers import BertModel

    original = dict(BertModel.from_pretrained(tiny_bert).named_parameters())
    kept = list(fresh.encoders["text"].model.named_parameters())
    assert len(kept) > 10 and all(torch.equal(p, original[n]) for n, p in kept)  # encoder weights untouched
    assert any((res.run_dir.parent / ".cache").iterdir())  # trained on the embedding cache
    assert res.metrics["test"]["recall@1"] > 0.2  # the projections alone learn (chance 0.125; seeds 1-3: 0.38-0.56)


def test_match_labels_train_a_pair_score(tmp_path, tiny_vit, tiny_bert):
    data = make_pairs(tmp_path / "neg", n=240, image_size=32, seed=1, negatives=0.3)
    res = mmtune.fit(_matcher_config(tmp_path, tiny_vit, tiny_bert, data, data={"match_label": "match"}))
    test = res.metrics["test"]
    assert test["queries"] < 60 and 0.0 <= test["pair_roc_auc"] <= 1.0
    saved = pd.read_csv(res.run_dir / "predictions" / "test.csv")
    assert set(saved["label"]) == {0, 1} and saved["probability"].between(0, 1).all()
    assert "probability" in mmtune.load(res.run_dir).score_pairs(_table(data["test"])).columns


@pytest.mark.parametrize("change, message", [
    ({"data": {"response": "caption"}}, "data.response='caption' is read by no encoder"),
    ({"data": {"response": "image"}}, "data.query and data.response are both 'image'"),
    ({"data": {"response": None}}, "needs both data.query and data.response"),
    ({"augment": {"mixup_alpha": 0.2}}, "a matcher has none"),
    ({"trainer": {"monitor": "val_acc"}}, "not logged by a matcher"),
])
def test_matching_config_mistakes_are_one_line(tmp_path, tiny_vit, tiny_bert, pairs, change, message):
    from mmtune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config(_matcher_config(tmp_path, tiny_vit, tiny_bert, pairs, **change))
    assert str(err.value).strip().splitlines()[0] == "invalid configuration:" and len(str(err.value).strip().splitlines()) == 2


@pytest.mark.stochastic
def test_zero_and_few_shot_classification_from_the_towers(matcher, pairs):
    from mmtune.demo import ITEMS

    pred = mmtune.load(matcher.run_dir)
    test = _table(pairs["test"])
    truth = test["text"].str.replace("this ", "", regex=False)
    zs = pred.zero_shot(test, ITEMS, template="this {}")
    assert list(zs.columns) == ITEMS and np.allclose(zs.sum(1), 1)
    assert (zs.idxmax(axis=1) == truth).mean() >= 0.6  # recall@1 of the same rows is >= 0.6
    train = _table(pairs["train"]).assign(item=lambda d: d["text"].str.replace("this ", "", regex=False))
    few = train.groupby("item").head(2)  # two labelled rows a class
    for head in ("centroid", "logistic"):
        p = pred.few_shot(few, "item", test, head=head)
        assert (p.idxmax(axis=1) == truth).mean() >= 0.6, head
    with pytest.raises(ValueError, match="template"):
        pred.zero_shot(test, ITEMS, template="no slot")
    with pytest.raises(ValueError, match="text side"):
        pred.zero_shot(test, ITEMS, side="response")  # the other side would be the images


def test_the_server_searches_embeds_and_scores(matcher, pairs, tmp_path):
    from fastapi.testclient import TestClient

    from mmtune.serving.server import ServeSettings, create_app

    pred = mmtune.load(matcher.run_dir)
    test = _table(pairs["test"])
    index = pred.index(test.drop_duplicates("text").reset_index(drop=True))
    index.save(tmp_path / "ix")
    settings = ServeSettings(search_index=str(tmp_path / "ix"), allow_paths=str(pairs["test"].parent))
    client = TestClient(create_app(pred, settings))
    rows = [{"image": {"path": p}} for p in pd.read_csv(pairs["test"])["image"][:3]]
    r = client.post("/search", json={"rows": rows, "top_k": 2})
    assert r.status_code == 200, r.text
    expected = pred.search(test[:3], index, 2)
    assert [h["id"] for hs in r.json()["hits"] for h in hs] == expected["id"].tolist()
    assert client.post("/search", json={"rows": rows, "top_k": 0}).status_code == 422
    assert client.post("/search", json={"rows": [{"colour": "red"}]}).status_code == 422
    e = client.post("/embed", json={"rows": [{"text": "this mug"}], "side": "response"})
    assert e.status_code == 200 and len(e.json()["embeddings"][0]) == 32
    s = client.post("/score", json={"rows": [{"image": rows[0]["image"], "text": test["text"][0]}]})
    assert s.status_code == 200 and s.json()["scores"][0]["score"] == pytest.approx(
        float(pred.score_pairs(test[:1])["score"][0]), abs=1e-5)
    bare = TestClient(create_app(pred, ServeSettings()))
    assert bare.post("/search", json={"rows": [{"text": "x"}]}).status_code == 409
    assert bare.get("/metadata").status_code == 200


@pytest.mark.stochastic
def test_a_joint_encoder_serves_as_both_towers(tmp_path, tiny_clip, pairs):
    cfg = base_config(tmp_path, {"clip": {"modality": "image_text", "checkpoint": tiny_clip}},
                      data={"train": str(pairs["train"]), "test": str(pairs["test"]), "query": "image", "response": "text"},
                      matching={"dim": 16}, trainer={"max_epochs": 10, "monitor": "val_loss", "batch_size": 32},
                      evaluation={"report": False})
    res = mmtune.fit(cfg)
    assert res.metrics["test"]["recall@1"] >= 0.25  # chance 0.125; trainer seeds 1-3 measured 0.31, 0.60, 0.98
    pred = mmtune.load(res.run_dir)
    test = _table(pairs["test"])
    saved = pd.read_csv(res.run_dir / "predictions" / "test.csv")
    assert np.allclose(pred.score_pairs(test)["score"].to_numpy(), saved["score"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("strategy", ["full", "partial", "gradual", "bitfit", "lora", "ia3"])
def test_every_strategy_trains_a_matcher_whose_bundle_reloads(tmp_path, tiny_vit, tiny_bert, strategy):
    from mmtune.finetune import STRATEGIES

    assert set(STRATEGIES.names()) == {"frozen", "full", "partial", "gradual", "bitfit", "lora", "ia3"}
    data = make_pairs(tmp_path / "d", n=64, image_size=32, seed=2)
    cfg = _matcher_config(tmp_path, tiny_vit, tiny_bert, data, finetune={"type": strategy}, trainer={"max_epochs": 2})
    res = mmtune.fit(cfg)
    before = {n: p.detach().clone() for n, p in mmtune.load(res.run_dir).model.encoders.named_parameters()}
    assert res.metrics["epochs_trained"] == 2
    saved = pd.read_csv(res.run_dir / "predictions" / "test.csv")
    got = mmtune.load(res.run_dir).score_pairs(_table(data["test"]))["score"].to_numpy()
    assert np.allclose(got, saved["score"].to_numpy(), atol=1e-5)  # LoRA / IA3 folded into plain weights
    from transformers import BertModel

    pretrained = dict(BertModel.from_pretrained(tiny_bert).named_parameters())
    changed = [n for n, p in before.items() if n.startswith("text.model.") and n[len("text.model."):] in pretrained
               and not torch.equal(p, pretrained[n[len("text.model."):]])]
    assert changed  # the strategy tuned the text encoder, not only the projections


def test_hard_negatives_are_the_nearest_remembered_responses_of_other_rows():
    from types import SimpleNamespace

    from mmtune.models.matcher import PairHead
    from mmtune.training.matching import MatchObjective

    torch.manual_seed(0)
    head = PairHead(0.1)
    obj = MatchObjective(SimpleNamespace(heads={"match": head}), labelled=False, hard_negatives=1).train()
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)  # noqa: E731
    q, r = unit(4), unit(4)
    first = obj({"query": q, "response": r}, {}, rows=torch.arange(4))
    assert torch.allclose(first, info_nce(q, r, head.scale).mean())  # nothing remembered yet: in-batch only
    q2, r2 = unit(2), unit(2)
    r2[1] = r[3]  # row 5's response is row 3's: a duplicate of its partner, never its negative
    second = obj({"query": q2, "response": r2}, {}, rows=torch.tensor([4, 5]))
    sims = q2 @ r.T
    sims[1, 3] = -float("inf")
    nearest = r[sims.argmax(1)][:, None, :]
    assert torch.allclose(second, info_nce(q2, r2, head.scale, extra=nearest).mean())
    assert not torch.allclose(second, info_nce(q2, r2, head.scale).mean())
    assert torch.equal(obj.bank[4], r2[0]) and bool(obj.seen[:6].all())
    obj.eval()  # validation: no mining, nothing remembered
    assert torch.allclose(obj({"query": q2, "response": r2}, {}, rows=torch.tensor([6, 7])),
                          info_nce(q2, r2, head.scale).mean()) and not bool(obj.seen[6:].any())


def test_the_report_of_a_matcher_shows_recall_at_k_and_the_worst_ranked_queries(matcher):
    from mmtune.evaluation.report import build_report

    page = build_report(matcher.run_dir).read_text()
    for section in ("Summary", "Recall at k", "Worst-ranked test queries", "Training curves"):
        assert f"<h2>{section}</h2>" in page
    assert page.count("<img") == 2 + matcher.config.evaluation.worst_examples  # two plots, each worst query's image
    assert f"{matcher.metrics['test']['recall@1']:.4f}" in page
    assert (matcher.run_dir / "plots" / "recall_at_k.png").stat().st_size > 1000


def test_a_pretrained_joint_encoder_is_a_zero_shot_matcher_as_it_was_trained(tmp_path, tiny_clip, pairs):
    """projection none + no epoch: the matcher's scores are CLIP's own image-text cosines."""
    from transformers import CLIPModel, CLIPTokenizerFast

    from mmtune.demo import ITEMS

    cfg = base_config(tmp_path, {"clip": {"modality": "image_text", "checkpoint": tiny_clip}},
                      data={"train": str(pairs["train"]), "test": str(pairs["test"]), "query": "image", "response": "text"},
                      matching={"projection": "none"}, finetune={"type": "frozen"},
                      trainer={"max_epochs": 0, "monitor": "val_loss"}, evaluation={"report": False})
    res = mmtune.fit(cfg)
    assert res.metrics["epochs_trained"] == 0
    pred = mmtune.load(res.run_dir)
    test = _table(pairs["test"]).head(6)
    p = pred.zero_shot(test, ITEMS, template="this {}")
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    from mmtune.encoders import build_encoder

    enc = build_encoder(res.config.model.encoders["clip"], res.run_dir / "encoders" / "clip")
    inputs = enc.processor({"image": [mmtune.modalities.modality_of("image").read(v, None) for v in test["image"]],
                            "text": [f"this {c}" for c in ITEMS[:6]]})
    with torch.no_grad():
        # CLIP's image and text embeddings, as its own similarity computes them
        img = clip.visual_projection(clip.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        names = enc.processor({"image": [None] * len(ITEMS), "text": [f"this {c}" for c in ITEMS]})
        txt = clip.text_projection(clip.text_model(input_ids=names["input_ids"],
                                                   attention_mask=names["attention_mask"]).pooler_output)
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    expected = torch.softmax((1 / 0.07) * img @ txt.T, dim=1).numpy()
    assert np.allclose(p.to_numpy(), expected, atol=1e-4)
    with pytest.raises(mmtune.config.ConfigError, match="max_epochs=0 trains nothing"):
        mmtune.config.load_config(base_config(tmp_path, {"clip": {"modality": "image_text", "checkpoint": tiny_clip}},
                                              trainer={"max_epochs": 0, "monitor": "val_loss"}))


@pytest.mark.stochastic
def test_a_classifiers_consistency_check_finds_rows_whose_modalities_disagree(tmp_path, tiny_vit, tiny_bert):
    """Both columns say the same thing (warm pictures come with keep notes, cool ones with return notes); rows
    given the other class's note are found by their one-modality predictions disagreeing."""
    from mmtune.cli import main
    from mmtune.demo import make_dataset

    paths = make_dataset(tmp_path / "d", n=480, image_size=32, seed=3)
    for split in ("train", "test"):
        df = pd.read_csv(paths[split])
        df[df["label"].isin(["warm-keep", "cool-return"])].to_csv(paths[split], index=False)
    cfg = base_config(tmp_path, {"image": {"modality": "image", "checkpoint": tiny_vit},
                                 "text": {"modality": "text", "checkpoint": tiny_bert}},
                      data={"train": str(paths["train"]), "test": str(paths["test"])},
                      model={"modality_dropout": 0.4}, evaluation={"report": False})
    res = mmtune.fit(cfg)
    test = _table(paths["test"])
    rng = np.random.default_rng(0)
    swapped = rng.choice(len(test), max(3, len(test) // 10), replace=False)
    keep, ret = test[test["label"] == "warm-keep"]["text"].tolist(), test[test["label"] == "cool-return"]["text"].tolist()
    for i in swapped:  # the other class's note
        test.loc[i, "text"] = ret[i % len(ret)] if test.loc[i, "label"] == "warm-keep" else keep[i % len(keep)]
    out = mmtune.load(res.run_dir).disagreement(test)
    assert {"disagreement", "image only", "text only", "prediction"} <= set(out.columns)
    assert out["disagreement"].between(0, 1).all() and out["disagreement"].is_monotonic_decreasing
    top = set(out["row"][:len(swapped)])
    assert len(top & set(swapped)) >= 0.6 * len(swapped), (sorted(top), sorted(swapped))
    test.to_csv(tmp_path / "checked.csv", index=False)
    assert main(["check-pairs", "--run", str(res.run_dir), "--data", str(tmp_path / "checked.csv"), "--out",
                 str(tmp_path / "c.csv"), "--html", str(tmp_path / "c.html")]) == 0
    assert "image alone" in (tmp_path / "c.html").read_text() and len(pd.read_csv(tmp_path / "c.csv")) == len(test)


def test_a_faiss_index_returns_the_exact_search_hits():
    pytest.importorskip("faiss")
    from mmtune.serving.matching import SearchIndex

    rng = np.random.default_rng(0)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, 16)))  # noqa: E731
    corpus, queries = unit(300), unit(20)
    ids, values = [f"r{i}" for i in range(300)], [f"v{i}" for i in range(300)]
    exact = SearchIndex(corpus, ids, values).search(queries, 5)
    fast = SearchIndex(corpus, ids, values, faiss=True).search(queries, 5)
    assert fast["id"].tolist() == exact["id"].tolist()
    assert np.allclose(fast["score"], exact["score"], atol=1e-5)


@pytest.mark.stochastic
def test_one_encoder_reading_both_columns_shares_its_weights_between_the_towers(tmp_path, tiny_bert):
    from mmtune.demo import ITEMS, KEEP

    rows = [{"id": i, "ask": f"this {ITEMS[i % 8]}", "answer": KEEP[i % 8]} for i in range(240)]
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    df[:180].to_csv(tmp_path / "train.csv", index=False)
    df[180:].to_csv(tmp_path / "test.csv", index=False)
    cfg = base_config(tmp_path, {"text": {"modality": "text", "checkpoint": tiny_bert, "fields": ["text.ask", "text.answer"]}},
                      data={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv"), "query": "ask",
                            "response": "answer"},
                      matching={"dim": 32, "shared_projection": True},
                      trainer={"max_epochs": 10, "monitor": "val_loss", "batch_size": 32}, evaluation={"report": False})
    res = mmtune.fit(cfg)
    model = mmtune.load(res.run_dir).model
    assert list(model.encoders) == ["text"] and list(model.fusion.proj) == ["query"]  # one encoder, one projection
    assert res.metrics["test"]["recall@1"] >= 0.6  # chance: 1/8
    pred = mmtune.load(res.run_dir)
    test = pd.read_csv(tmp_path / "test.csv")
    saved = pd.read_csv(res.run_dir / "predictions" / "test.csv")
    assert np.allclose(pred.score_pairs(test)["score"].to_numpy(), saved["score"].to_numpy(), atol=1e-5)


def test_a_table_without_the_response_column_is_one_line_from_the_cli(tmp_path, tiny_vit, tiny_bert, pairs, capsys):
    import yaml

    from mmtune.cli import main

    lacking = tmp_path / "no-text.csv"
    pd.read_csv(pairs["train"]).drop(columns=["text"]).assign(image=lambda d: [str(pairs["train"].parent / p)
                                                                                for p in d["image"]]).to_csv(lacking, index=False)
    cfg = _matcher_config(tmp_path, tiny_vit, tiny_bert, pairs, data={"train": str(lacking)})
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no column(s) 'text'" in err


@pytest.mark.parametrize("command", [
    ["predict", "--out", "{tmp}/p.csv"], ["evaluate"], ["embed", "--out", "{tmp}/e.csv"], ["explain", "--out", "{tmp}/x"],
    ["export", "--out", "{tmp}/onnx"], ["prune", "--sparsity", "0.5", "--out", "{tmp}"]])
def test_classifier_commands_on_a_matcher_are_one_line(matcher, pairs, tmp_path, capsys, command):
    from mmtune.cli import main

    argv = [command[0], "--run", str(matcher.run_dir), "--data", str(pairs["test"]),
            *[a.format(tmp=tmp_path) for a in command[1:]]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a matcher" in err, err


def test_a_matchers_predictor_refuses_classifier_calls_with_what_it_offers(matcher, pairs):
    pred = mmtune.load(matcher.run_dir)
    with pytest.raises(ValueError, match="is a matcher.*search"):
        pred.predict(pairs["test"])
    from mmtune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="fills in a classifier's recipe"):
        load_config({**matcher.config.to_dict(), "preset": "fast"})
