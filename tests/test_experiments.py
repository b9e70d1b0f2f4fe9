"""The study and benchmark scripts run end to end in --smoke mode and write their tables.

Tiny models and budgets: two reducers / two mechanisms, a few steps, outputs in tmp_path.
"""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def table_header(md: str, first: str) -> list:
  line = next(l for l in md.splitlines() if l.startswith(f"| {first} |"))
  return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def token_results(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("token_reduction")
  load("token_reduction").main(["--smoke", "--methods=evit,tome", "--rates=0.5", "--batch=2",
                                f"--out_dir={out}", f"--data_dir={data_dir}"])
  return out


def test_token_reduction_outputs(token_results):
  with open(token_results / "token_reduction.json") as f:
    res = json.load(f)
  rows = res["speed"]["2"]["rows"]
  assert {r["method"] for r in rows} == {"evit", "tome"}
  for r in rows:
    assert {"setting", "tokens", "gmacs", "mac_ratio", "img_s", "speed_ratio"} <= set(r)
    assert r["mac_ratio"] > 1.0 and r["speed_ratio"] > 0
  acc = res["accuracy"]
  assert 0.0 <= acc["baseline"]["top1"] <= 1.0
  by_method = {r["method"]: r for r in acc["rows"]}
  assert set(by_method) == {"evit", "tome"}
  for r in acc["rows"]:  # both are parameter-free: evaluated off the shelf too
    assert r["off_the_shelf"] is not None and 0.0 <= r["finetuned"] <= 1.0
  md = (token_results / "token_reduction.md").read_text()
  assert table_header(md, "method")[:7] == ["method", "setting", "tokens", "GMACs", "MAC ratio",
                                            "img/s", "speed ratio"]
  assert "fine-tuned" in table_header(md.split("### Accuracy")[1], "method")
  assert (token_results / "token_reduction_pareto.png").stat().st_size > 0
  assert (token_results / "token_reduction_evit_stages.png").stat().st_size > 0


def test_attention_zoo_outputs(tmp_path, data_dir):
  load("attention_zoo").main(["--smoke", "--mechanisms=mhsa,sigmoid", f"--out_dir={tmp_path}",
                              f"--data_dir={data_dir}"])
  with open(tmp_path / "attention_zoo.json") as f:
    res = json.load(f)
  rows = {r["mechanism"]: r for r in res["rows"]}
  assert set(rows) == {"mhsa", "sigmoid"}
  for r in rows.values():
    assert len(r["top1"]) == 2 and r["params"] > 0
    assert r["flops_source"] == "analytic" and 0.9 < r["xla_over_analytic"] < 1.5
    assert r["forward_ratio"] > 0 and r["train_ratio"] > 0
  assert rows["mhsa"]["train_ratio"] == 1.0
  md = (tmp_path / "attention_zoo.md").read_text()
  assert table_header(md, "mechanism") == ["mechanism", "tier", "params", "MFLOPs", "source",
                                           "XLA MFLOPs", "XLA/analytic", "fwd ratio",
                                           "train ratio", "top-1 (%)"]
  assert (tmp_path / "attention_zoo.png").stat().st_size > 0
  # a later run of a subset keeps the other rows
  load("attention_zoo").main(["--smoke", "--mechanisms=relu", "--merge", f"--out_dir={tmp_path}",
                              f"--data_dir={data_dir}"])
  with open(tmp_path / "attention_zoo.json") as f:
    merged = json.load(f)
  assert [r["mechanism"] for r in merged["rows"]] == ["mhsa", "relu", "sigmoid"]
  assert merged["merged"]["mechanisms"] == ["sigmoid"]
  assert {r["mechanism"]: r for r in merged["rows"]}["sigmoid"] == rows["sigmoid"]


def test_attention_zoo_spatial_task(tmp_path, data_dir):
  """digits16: 16x16 digits (an 8x8 grid), Tier S mechanisms at local sizes, own output files."""
  load("attention_zoo").main(["--smoke", "--task=digits16", "--mechanisms=window",
                              f"--out_dir={tmp_path}", f"--data_dir={data_dir}"])
  with open(tmp_path / "attention_zoo_digits16.json") as f:
    res = json.load(f)
  assert [r["mechanism"] for r in res["rows"]] == ["mhsa", "window"]
  assert res["config"]["options"]["window"] == {"window_size": 4}
  assert all("error" not in r for r in res["rows"])
  # 4x4 windows on an 8x8 grid (plus the [CLS] row): fewer attention FLOPs than mhsa's
  assert res["rows"][1]["mflops_xla"] < res["rows"][0]["mflops_xla"]
  assert not (tmp_path / "attention_zoo.json").exists()


def test_kernel_benchmark_outputs(tmp_path):
  out = tmp_path / "kernels.json"
  assert load("kernels").main(["--smoke", "--runs=1", "--warmup=0", f"--out={out}"]) == 0
  with open(out) as f:
    res = json.load(f)
  assert {r["method"] for r in res["rows"]} == {"xla", "pallas", "pallas_sigmoid"}
  assert all(r["ms"] > 0 for r in res["rows"])
  assert [r["impl"] for r in res["e2e"]] == ["reference", "xla", "pallas"]
  for r in res["e2e"]:
    assert r["train_img_s"] > 0 and r["train_tflops"] > 0 and r["mfu"] is None  # no CPU peak
  assert [r["tokens"]["name"] for r in res["reduction_share"]] == ["evit", "tome"]
  assert all(r["share"] > 0 for r in res["reduction_share"])


def test_backbone_benchmark_outputs(tmp_path):
  assert load("backbones").main(["--smoke", "--train", f"--out_dir={tmp_path}"]) == 0
  with open(tmp_path / "backbones.json") as f:
    rows = json.load(f)["rows"]
  assert [r["label"] for r in rows] == ["swin_tiny"]
  assert rows[0]["params"] > 0 and rows[0]["infer_img_s"] > 0 and rows[0]["train_img_s"] > 0
  # XLA's count of the compiled forward is close to the analytic one (padding-free tiny Swin)
  assert 0.8 < rows[0]["xla_gmacs"] / rows[0]["analytic_gmacs"] < 1.5
  assert table_header((tmp_path / "backbones.md").read_text(), "backbone")[-1] == "train ratio"
  assert (tmp_path / "backbones.png").stat().st_size > 0


def test_depthwise_benchmark_outputs(tmp_path):
  out = tmp_path / "depthwise.json"
  assert load("depthwise").main(["--smoke", f"--out={out}"]) == 0
  with open(out) as f:
    row = json.load(f)["row"]
  assert row["max_abs_diff"] < 1e-5  # the shifted sums compute the grouped conv
  assert all(row[k] > 0 for k in ("grouped_ms", "shifted_ms", "grouped_grad_ms", "dense_ms"))
