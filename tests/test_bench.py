"""The benchmark scripts still run (tiny settings); their figures are for the README, not asserted.

Each script runs as its own ``__main__`` inside the test's worker (the interpreter and its imports are the session's:
a fresh interpreter spends about 10 s importing torch, Lightning and transformers before the script starts); the
scripts that measure a fresh process (cpu, scale, serve_load) still start theirs."""
import json
import os
import runpy
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"


@pytest.fixture
def bench(capsys, monkeypatch, tmp_path):
    """``bench("speed.py", "--rows", "48")`` runs the script as ``python bench/speed.py --rows 48`` would and returns
    its last printed line as JSON; what the script changes in the process (environment, warning filters, torch's
    threads and random state, the temporary folder) is put back after it."""
    def run(script: str, *args: str) -> dict:
        monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
        monkeypatch.syspath_prepend(str(BENCH))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the scripts' scratch folders, removed by pytest
        env, threads, rng = dict(os.environ), torch.get_num_threads(), torch.get_rng_state()
        try:
            with warnings.catch_warnings():
                runpy.run_path(str(BENCH / script), run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (None, 0), f"{script} exited with {exc.code!r}"
        finally:
            os.environ.clear()
            os.environ.update(env)
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return run


def test_speed_bench_runs_and_prints_its_json(bench):
    last = bench("speed.py", "--rows", "48", "--epochs", "2", "--single", "3")
    assert set(last) == {"fit_samples_per_s", "plain_loop_samples_per_s", "ratio", "predict_rows_per_s",
                         "predict_p50_ms", "predict_p99_ms", "peak_rss_mb"}
    assert all(v > 0 for v in last.values())


def test_modalities_bench_runs_and_prints_its_json(bench):
    last = bench("modalities.py", "--rows", "40", "--epochs", "1")
    assert {"audio_text_acc", "audio_only_acc", "tabular_text_acc", "regression_r2", "two_text_columns_acc"} <= set(last)
    assert all(0.0 <= last[k] <= 1.0 for k in ("audio_text_acc", "audio_only_acc", "tabular_text_acc", "two_text_columns_acc"))


def test_predict_bench_runs_and_prints_its_json(bench, tiny_run, tmp_path):
    last = bench("predict.py", "--run", str(tiny_run.run_dir), "--work", str(tmp_path), "--repeat", "1", "--single", "3",
                 "--rounds", "2", "--batch-size", "8")
    assert {"torch_rows_per_s", "onnx_rows_per_s", "int8_rows_per_s", "onnx_speedup", "int8_speedup", "int8_accuracy_delta",
            "static_int8_speedup", "static_int8_accuracy_delta", "static_int8_convolutions",
            "p50_ms_best", "max_abs_prob_diff"} <= set(last)
    assert last["static_int8_convolutions"] in ("static", "float")  # the ViT's patch convolution: static if it held
    assert last["max_abs_prob_diff"] <= 1e-4 and all(last[k] > 0 for k in ("torch_rows_per_s", "onnx_rows_per_s", "int8_rows_per_s"))
    # the demo task's texts: sorted by tokens, the batches hold fewer positions than sorted by characters
    assert 0 < last["padded_positions"]["tokens"] < last["padded_positions"]["characters"]
    assert set(last["token_order_speedup"]) == {"torch", "static-int8"} and all(v > 0 for v in last["token_order_speedup"].values())


def test_attention_bench_runs_and_prints_its_json(bench, tiny_run, tmp_path):
    last = bench("attention.py", "--run", str(tiny_run.run_dir), "--work", str(tmp_path), "--rounds", "1", "--repeat", "1")
    assert {"fp32_plain_s", "fp32_folded_s", "fp32_ratio", "int8_plain_s", "int8_folded_s", "int8_ratio"} <= set(last)
    assert last["max_abs_prob_diff"] <= 1e-5  # the fold changes no number
    # the tiny ViT's and BERT's attention layers, every one folded (four transposes each)
    assert last["attention_nodes"] >= 2 and last["transposes_removed"] == 4 * last["attention_nodes"]


def test_onnx_profile_bench_splits_the_graphs_time_by_operator_and_convolution(bench, tiny_run, tmp_path):
    last = bench("onnx_profile.py", "--run", str(tiny_run.run_dir), "--work", str(tmp_path), "--repeat", "1", "--passes", "1")
    assert last["rows"] == len(pd.read_csv(tiny_run.config.data.test)) and last["kernel_s"] > 0
    import onnx

    # every operator type of the graph onnxruntime ran (its optimized form, written beside the profile) has its time
    ran = onnx.load(str(tmp_path / "profiled.optimized.onnx"), load_external_data=False).graph.node
    assert set(last["op_s"]) == {n.op_type for n in ran}
    # every convolution node of the optimized graph is given a kind: the kinds sum to the convolution operators' time
    conv_ops = sum(s for op, s in last["op_s"].items() if "Conv" in op)
    assert sum(last["conv_s"].values()) == pytest.approx(conv_ops, abs=1e-3)
    assert set(last["conv_s"]) == {"picture"}  # the tiny ViT's one convolution: its 3-channel patch embedding
    assert "Attention" in last["op_s"] or "MatMul" in last["op_s"] or "DynamicQuantizeMatMul" in last["op_s"]


def test_serve_bench_runs_and_prints_its_json(bench, tiny_run):
    # the PyTorch backend: test_deploy covers the ONNX server, and the prediction bench the export
    last = bench("serve_load.py", "--run", str(tiny_run.run_dir), "--clients", "4", "--seconds", "2", "--bad-share", "0.25",
                 "--backend", "torch")
    assert {"clients", "requests_per_s", "p50_ms", "p99_ms", "errors", "batched_speedup"} <= set(last)
    assert last["errors"] == 0 and last["requests_per_s"] > 0 and last["clients"] == 4
    assert last["bad_requests"] > 0 and last["bad_not_4xx"] == 0  # bad requests turned away, good ones all served


def test_presets_bench_runs_and_prints_its_json(bench, tmp_path):
    last = bench("presets.py", "--rows", "40", "--tasks", "orders", "--presets", "fast,best", "--best-seconds", "8",
                 "--work", str(tmp_path / "p"))
    assert set(last) == {"fast", "best", "linear_probe"}
    assert all(0.0 <= v["orders"]["accuracy"] <= 1.0 and v["orders"]["seconds"] >= 0 for v in last.values())
    assert last["best"]["orders"]["trials"] >= 1


def test_throughput_bench_runs_and_prints_its_json(bench):
    last = bench("throughput.py", "--batch", "4", "--steps", "2", "--warmup", "1", "--peak-n", "256")
    assert {"samples_per_s", "mfu", "plain_loop_ratio", "data_wait_fraction", "flops_per_sample"} <= set(last)
    assert last["samples_per_s"] > 0 and last["mfu"] > 0 and 0 <= last["data_wait_fraction"] < 1
    # GFLOP: 3 x the forward of EfficientNet-Lite0 at 96 px (0.14) and MiniLM over the batch's tokens (0.32 at 15)
    assert 0.5 < last["flops_per_sample"] < 5


def test_scale_bench_runs_and_prints_its_json(bench, tmp_path):
    last = bench("scale.py", "--rows", "200,2000", "--work", str(tmp_path))
    assert set(last["rss_mb_by_rows"]) == {"200", "2000"} and all(v > 0 for v in last["rss_mb_by_rows"].values())
    assert last["rss_growth_per_10x"] > 0


def test_cpu_bench_runs_and_the_allocator_settings_change_no_number(bench):
    """Two fresh processes, with and without mmtune.memory's settings: the seeded weights are identical."""
    last = bench("cpu.py", "--rows", "40", "--steps", "2", "--image-size", "64", "--repeats", "1")
    assert {"sys_share_before", "sys_share_after", "wall_ratio", "same_weights"} <= set(last)
    assert last["same_weights"] is True and 0 <= last["sys_share_after"] < 1 and last["wall_ratio"] > 0


def test_automl_bench_runs_and_prints_its_json(bench, tmp_path):
    last = bench("automl.py", "--rows", "40", "--budgets", "10", "--tasks", "orders", "--presets", "fast,best",
                 "--image-size", "64", "--work", str(tmp_path))
    assert {"orders_fast", "orders_fast_s", "orders_best10", "orders_best10_s", "orders_linear_probe",
            "best_not_below_balanced", "within_budget"} <= set(last)
    assert 0 <= last["orders_best10"] <= 1 and last["orders_best10_s"] > 0


def test_groups_bench_runs_and_prints_its_json(bench):
    last = bench("groups.py", "--groups", "10", "--rows", "4", "--seeds", "1")
    assert {"random_val_acc", "random_test_acc", "grouped_val_acc", "grouped_test_acc", "random_warned"} <= set(last)


def test_matching_bench_runs_and_prints_its_json(bench, tmp_path):
    last = bench("matching.py", "--rows", "48", "--epochs", "1", "--image-size", "32", "--work", str(tmp_path))
    assert {"image_text_r1_frozen", "image_text_r1_tuned", "text_text_r1_tuned", "swap_precision_top_decile"} <= set(last)
    assert all(0.0 <= last[k] <= 1.0 for k in ("image_text_r1_frozen", "image_text_r1_tuned", "swap_precision_top_decile"))


def test_prepare_bench_finds_the_same_batches_and_less_left_to_the_collating_thread(bench):
    last = bench("prepare.py", "--photos", "3", "--size", "160x120", "--side", "32", "--rounds", "1", "--texts", "20",
                 "--words", "30", "--max-length", "16")
    text = last.pop("text (MiniLM tokenizer)")
    assert len(last) == 3 and all(v["same"] for v in last.values()) and text["same"]
    assert all({"raw_ms", "prepare_ms", "prepared_ms"} <= set(v) for v in last.values())
    assert {"raw_ms", "count_ms", "count_only_ms", "prepared_ms"} <= set(text)


def test_decode_bench_runs_and_prints_its_json(bench, tiny_run):
    last = bench("decode.py", "--photos", "2", "--size", "640x480", "--side", "32", "--rounds", "1",
                 "--run", str(tiny_run.run_dir), "--fit-rows", "24", "--fit-epochs", "1")
    assert {"full_ms", "draft_ms", "decode_speedup", "check_speedup", "predict_speedup", "fit_speedup"} <= set(last)
    assert last["max_pixel_diff"] <= 8 and last["mean_pixel_diff"] < 1.0  # 640 x 480 read at 1/4 for 32 px
    assert set(last["predict_rows_per_s"]) == set(last["fit_seconds"]) == set(last["fit_accuracy"]) == {"draft", "full"}
