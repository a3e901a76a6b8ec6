"""The collapse watch (losses/collapse.py): lightly's std_of_l2_normalized against a float64 formula, the warning's
rule, and two tiny runs: one that collapses (SGD at a huge LR, no warm-up: warned once, std about 0) and a healthy
one (no warning) whose log line, metrics.jsonl and TensorBoard hold the embedding std and the online probe's top-1."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from supcon_scale import config, console, distributed, trainer
from supcon_scale.losses.collapse import CollapseWatch, embedding_std, std_of_l2_normalized


def test_std_of_l2_normalized_against_float64():
    z = torch.randn(40, 2, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rows = z.reshape(-1, 16).double().numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    want = np.sqrt(((unit - unit.mean(0)) ** 2).sum(0) / (len(unit) - 1)).mean()  # unbiased, as torch.std
    assert float(std_of_l2_normalized(z.reshape(-1, 16))) == pytest.approx(want, rel=1e-5)
    assert embedding_std(z) == pytest.approx(want, rel=1e-9)
    assert embedding_std(torch.ones(8, 2, 16) * 5) == pytest.approx(0.0, abs=1e-7)  # total collapse
    spread = torch.nn.functional.normalize(torch.randn(20000, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert embedding_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.01)  # healthy: about 1/sqrt(D)


def test_the_watch_says_it_once_after_three_windows_in_a_row():
    watch, d, u = CollapseWatch(), 64, math.log(511)
    healthy, low = 0.1, 0.001  # 1/sqrt(64) = 0.125; collapsed below 0.0125
    assert [watch.check(s, d, 5.0, u) for s in (low, low, healthy, low, low)] == [None] * 5  # reset by a healthy one
    said = watch.check(low, d, 5.0, u)
    assert said.startswith("the embeddings look collapsed: embedding std 0.001 (healthy about 1/sqrt(64) = 0.125)")
    assert "warm-up" in said and watch.check(low, d, 5.0, u) is None  # once per run
    flat = CollapseWatch()
    assert [flat.check(healthy, d, loss, u) for loss in (u, u + 5e-4)] == [None, None]
    assert "loss 6.2359 at log(M - 1) = 6.2364, the loss of equal logits" in flat.check(healthy, d, u - 5e-4, u)
    assert CollapseWatch().check(healthy, d, u, None) is None  # no uniform value known: only the std counts


def _fit(tmp_path: Path, capsys, *extra: str) -> tuple[str, list[dict]]:
    """A 6-step run of a tiny ResNet on synthetic images, a line per step; its stderr and metrics rows."""
    overrides = [f"out_dir={tmp_path}", "data.backend=synthetic", "data.num_classes=4", "data.global_batch_size=16",
                 "data.image_size=16", "model.encoder=test_resnet", "model.feat_dim=16", "train.epochs=1",
                 "train.max_steps=6", "train.warmup_epochs=0", "train.log_every=1", "log.plain=true",
                 *extra]  # fmt: skip
    capsys.readouterr()
    trainer.fit(config.load(None, overrides), distributed.init(seed=0))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return capsys.readouterr().err, rows


def test_a_collapsing_run_is_warned_once(tmp_path: Path, capsys):
    """SGD at lr 6 (base_lr 100) without warm-up: the embeddings collapse at step 2 and the loss sits at
    log(M - 1) = ln 31 (32 views); one warning, naming both, the std about 0."""
    err, rows = _fit(tmp_path, capsys, "optim.name=sgd", "optim.base_lr=100")
    said = [line for line in err.splitlines() if "look collapsed" in line]
    assert len(said) == 1 and said[0].startswith("[rank 0] warning: step 4: the embeddings look collapsed"), err
    assert "1/sqrt(16)" in said[0] and f"log(M - 1) = {math.log(31):.4f}" in said[0]
    assert all(r["embedding_std"] < 0.01 for r in rows[1:])  # 1/sqrt(16) = 0.25 when healthy
    assert rows[-1]["loss"] == pytest.approx(math.log(31), abs=1e-3)


def test_a_healthy_run_shows_std_and_probe_everywhere_and_is_not_warned(tmp_path: Path, capsys):
    err, rows = _fit(tmp_path, capsys, "train.online_probe=true", "log.tensorboard=true")
    assert "look collapsed" not in err
    lines = [line for line in err.splitlines() if " views/s " in line]
    assert len(lines) == len(rows) == 6
    pattern = re.compile(r" loss (\S+) emb-std (\S+) probe top-1 (\S+)% \[(\S+), (\S+)\] \(n=(\d+)\) lr ")
    for line, row in zip(lines, rows, strict=True):
        m = pattern.search(line)
        assert m, line
        assert float(m.group(2)) == pytest.approx(row["embedding_std"], abs=1e-4) and row["embedding_std"] > 0.05
        assert float(m.group(3)) == pytest.approx(100 * row["probe_top1"], abs=0.01) and row["probe_n"] == 32
        assert [float(m.group(4)), float(m.group(5))] == pytest.approx(
            [100 * x for x in row["probe_top1_interval_95"]], abs=0.05
        )
    scalars = _tensorboard(tmp_path / "tensorboard")
    for key in ("embedding_std", "probe_top1", "probe_n"):
        assert scalars[f"train/{key}"] == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6), key


def _tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_log_line_shows_std_and_probe():
    record = {"step": 120, "epoch": 2, "loss": 5.12345, "lr": 0.48, "views_per_s": 1234.4, "embedding_std": 0.07123,
              "probe_top1": 0.452, "probe_top1_interval_95": [0.431, 0.473], "probe_n": 2560}  # fmt: skip
    line = console.log_line(record, 3000, eta_s=3723)
    assert line.endswith("step 120/3000 epoch 2 loss 5.1235 emb-std 0.0712 probe top-1 45.20% [43.1, 47.3] (n=2,560) "
                         "lr 0.48 1,234 views/s eta 1:02:03")  # fmt: skip
