"""`make test-mutation`: plant one small bug at a time in a temporary copy and run the tests meant to catch it.

Each mutation names a file, an exact snippet of it, its replacement and the tests that should fail. The tool copies
the repository (without .venv, runs/ and caches) once, then for each mutation writes the mutated file, runs those
tests with `-x`, and restores the file. A mutation whose snippet is no longer in the file is reported as stale (the
list must follow the code). It prints the kill rate and every survivor; `--json` writes the details.

    python tools/mutation.py [--only NAME ...] [--json runs/mutation.json] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository
    why_equivalent: str = ""  # non-empty: a mutation known to be equivalent (not counted as a survivor)


M = Mutation
MUTATIONS: list[Mutation] = [
    # losses/
    M(
        "loss: scale=temperature ignored",
        "supcon_scale/losses/supcon.py",
        'if self.scale == "temperature":\n            return self.temperature',
        'if self.scale == "temperature":\n            return 1.0',
        ("tests/test_losses_distributed.py::test_loss_scale_holds_across_ranks",),
    ),
    M(
        "loss: base_temperature multiplied",
        "supcon_scale/losses/supcon.py",
        "return self.temperature / self.base_temperature",
        "return self.temperature * self.base_temperature",
        ("tests/test_losses_distributed.py::test_loss_scale_holds_across_ranks",),
    ),
    M(
        "loss: scale factor never applied",
        "supcon_scale/losses/supcon.py",
        "rows = self._rows(za, zc, pos, weight, zk) * self.scale_factor()",
        "rows = self._rows(za, zc, pos, weight, zk)",
        ("tests/test_losses_distributed.py::test_loss_scale_holds_across_ranks",),
    ),
    M(
        "loss: L_out sums the positives instead of averaging",
        "supcon_scale/losses/supcon.py",
        "return stats[0] - positive_sum / weight",
        "return stats[0] - positive_sum",
        ("tests/test_losses.py",),
    ),
    M(
        "loss: L_in without log |P|",
        "supcon_scale/losses/supcon.py",
        "return stats[0] - stats[1] + torch.log(weight)",
        "return stats[0] - stats[1]",
        ("tests/test_losses.py",),
    ),
    M(
        "loss: temperature dropped from the logits",
        "supcon_scale/losses/supcon.py",
        "inv_tau = 1.0 / self.temperature",
        "inv_tau = 1.0",
        ("tests/test_losses.py",),
    ),
    M(
        "loss: only_negatives denominator keeps the positives",
        "supcon_scale/losses/supcon.py",
        'den = "neg" if self.denominator_mode == "only_negatives"',
        'den = "all" if self.denominator_mode == "only_negatives"',
        ("tests/test_losses.py",),
    ),
    # distributed.py: the gather with gradients
    M(
        "gather: backward without the sum over ranks",
        "supcon_scale/distributed.py",
        "dist.all_reduce(grad, op=dist.ReduceOp.SUM)\n        start = sum(ctx.sizes[: ctx.rank])",
        "start = sum(ctx.sizes[: ctx.rank])",
        ("tests/test_losses_distributed.py",),
    ),
    M(
        "gather: backward returns rank 0's slice",
        "supcon_scale/distributed.py",
        "start = sum(ctx.sizes[: ctx.rank])",
        "start = 0",
        ("tests/test_losses_distributed.py",),
    ),
    M(
        "gather: this rank's offset reported as 0",
        "supcon_scale/distributed.py",
        "return gathered, sum(sizes[: dist.get_rank()])",
        "return gathered, 0",
        ("tests/test_losses_distributed.py",),
    ),
    # engines/
    M(
        "engines: non-finite steps applied",
        "supcon_scale/engines/base.py",
        "stepped = bool(all_reduce_min(local_grads_finite(params).to(device)).item())",
        "stepped = True",
        ("tests/test_reliability.py::test_nan_steps_are_skipped_counted_then_stop_the_run",),
    ),
    M(
        "engines: schedule advances on skipped steps",
        "supcon_scale/engines/base.py",
        "    if stepped:\n        scheduler.step()",
        "    scheduler.step()",
        ("tests/test_engines.py::test_fp16_loss_scaling_skips_and_counts_overflowing_steps",),
    ),
    M(
        "zero_lars: norms of the local pieces only",
        "supcon_scale/engines/zero_lars.py",
        "dist.all_reduce(sums, group=layout.group)",
        "sums = sums",
        ("tests/test_engines.py::test_zero_lars_on_partitions_equals_lars_on_whole_tensors",),
    ),
    # optim.py
    M(
        "optim: no linear LR scaling",
        "supcon_scale/optim.py",
        "return cfg.base_lr * global_batch_size / 256",
        "return cfg.base_lr",
        ("tests/test_optim.py",),
    ),
    M(
        "optim: batch-norm/bias tensors not excluded",
        "supcon_scale/optim.py",
        "exempt = p.ndim <= 1 or",
        "exempt = p.ndim < 1 or",
        ("tests/test_optim.py",),
    ),
    M(
        "optim: warm-up off by one",
        "supcon_scale/optim.py",
        "return (step + 1) / warmup_steps",
        "return step / warmup_steps",
        ("tests/test_optim.py",),
    ),
    M(
        "optim: half a cosine",
        "supcon_scale/optim.py",
        "0.5 * (1 + math.cos(math.pi * progress))",
        "0.5 * (1 + math.cos(math.pi * progress / 2))",
        ("tests/test_optim.py",),
    ),
    M(
        "optim: final_lr_fraction dropped",
        "supcon_scale/optim.py",
        "return final_fraction + (1 - final_fraction) * 0.5",
        "return 0.0 + (1 - 0.0) * 0.5",
        ("tests/test_optim.py",),
    ),
    # data/sharding.py
    M(
        "sharding: ranks not strided",
        "supcon_scale/data/sharding.py",
        "[rank :: self.world_size]",
        "[rank :: 1]",
        ("tests/test_data_sharding.py",),
    ),
    M(
        "sharding: no padding without drop_last",
        "supcon_scale/data/sharding.py",
        "pad = -len(rest) % self.world_size",
        "pad = 0",
        ("tests/test_data_sharding.py",),
    ),
    M(
        "sharding: resume ignores the position",
        "supcon_scale/data/sharding.py",
        "rest = kept[min(start * self.global_batch, len(kept)) :]",
        "rest = kept",
        ("tests/test_data.py",),
    ),
    M(
        "sharding: seed of a saved position not checked",
        "supcon_scale/data/sharding.py",
        'if int(state["seed"]) != self.seed:',
        "if False:",
        ("tests/test_data_sharding.py",),
    ),
    M(
        "sharding: the same order every epoch",
        "supcon_scale/data/sharding.py",
        "default_rng([seed, epoch, 0x5C])",
        "default_rng([seed, 0, 0x5C])",
        ("tests/test_data.py", "tests/test_data_sharding.py"),
    ),
    # data/balanced.py (data.sampler=m_per_class)
    M(
        "balanced: a batch straddling two rounds may repeat a class or an image",
        "supcon_scale/data/balanced.py",
        "        if held:",
        "        if False:",
        ("tests/test_data_sampler.py",),
    ),
    M(
        "balanced: a repeated image keeps the views of its first use",
        "supcon_scale/data/balanced.py",
        "uses[by_sample] = np.arange(len(order)) - first",
        "uses[by_sample] = 0",
        ("tests/test_data_sampler.py::test_draws_count_the_earlier_uses_of_a_sample",),
    ),
    # checkpoint.py
    M(
        "checkpoint: keeps one more than keep_last",
        "supcon_scale/checkpoint.py",
        "for old in done[:-keep_last]:",
        "for old in done[: -keep_last - 1]:",
        ("tests/test_checkpoint.py",),
    ),
    M(
        "checkpoint: a directory without meta.json counts as complete",
        "supcon_scale/checkpoint.py",
        "return STEP_DIR.match(path.name) is not None and (path / META).is_file()",
        "return STEP_DIR.match(path.name) is not None",
        ("tests/test_checkpoint.py",),
    ),
    M(
        "checkpoint: torch RNG not restored",
        "supcon_scale/checkpoint.py",
        'torch.set_rng_state(state["torch"])',
        "pass",
        ("tests/test_checkpoint.py",),
    ),
    M(
        "checkpoint: python RNG not restored",
        "supcon_scale/checkpoint.py",
        'random.setstate((3, tuple(state["python"]), None))',
        "pass",
        ("tests/test_checkpoint.py",),
    ),
    M(
        "checkpoint: cifar_stem exported as False",
        "supcon_scale/export.py",
        'name, cifar_stem = model["encoder"], bool(model.get("cifar_stem", False))',
        'name, cifar_stem = model["encoder"], False',
        ("tests/test_checkpoint.py::test_trained_checkpoint_exports_its_stem",),
    ),
    M(
        "knn: the monitor leaves the encoder in eval mode",
        "supcon_scale/evaluation/features.py",
        "    encoder.train(was_training)",
        "    encoder.train(False)",
        ("tests/test_trainer.py::test_knn_monitor_leaves_the_encoder_training",),
    ),
    M(
        "checkpointer: no save at the end of an epoch",
        "supcon_scale/checkpoint.py",
        "or info.epoch_end or info.last:",
        "or info.last:",
        ("tests/test_trainer.py::test_resume_after_epoch_one_matches_uninterrupted",),
    ),
    # evaluation/
    M(
        "knn: weights without the temperature",
        "supcon_scale/evaluation/knn.py",
        "weights = (sim / temperature).exp()",
        "weights = sim.exp()",
        ("tests/test_evaluation_metrics.py",),
    ),
    M(
        "knn: one neighbour only",
        "supcon_scale/evaluation/knn.py",
        "_, idx = (q.to(fast.dtype) @ fast.T).topk(k, dim=1)",
        "_, idx = (q.to(fast.dtype) @ fast.T).topk(1, dim=1)",
        ("tests/test_evaluation_metrics.py",),
    ),
    M(
        "robustness: mCE as the max",
        "supcon_scale/evaluation/mce.py",
        '"mce": math.fsum(ce.values()) / len(ce)',
        '"mce": max(ce.values())',
        ("tests/test_evaluation_metrics.py",),
    ),
    M(
        "robustness: relative CE ignores the clean error",
        "supcon_scale/evaluation/mce.py",
        "rel[c] = 100.0 * (_mean(e) - float(clean_error)) / gap",
        "rel[c] = 100.0 * _mean(e) / gap",
        ("tests/test_evaluation_metrics.py",),
    ),
    M(
        "robustness: a zero baseline error is scored",
        "supcon_scale/evaluation/mce.py",
        "if _mean(e) > 0]",
        "if _mean(e) >= 0]",
        ("tests/test_evaluation_metrics.py",),
    ),
    M(
        "stats: the interval may exclude the accuracy",
        "supcon_scale/evaluation/stats.py",
        "min(1.0, max(p, centre + half))",
        "min(1.0, centre + half)",
        ("tests/test_evaluation_linear.py::test_wilson_interval_against_its_formula_and_overlap",),
    ),
    M(
        "mce: AlexNet divides a mean over fewer than five severities",
        "supcon_scale/evaluation/mce.py",
        "short = [c for c, e in errors.items() if len(e) != len(SEVERITIES)]",
        "short = []",
        ("tests/test_evaluation_robustness.py::test_a_three_severity_mean_is_never_divided_by_alexnets_five",),
    ),
    M(
        "plots: the severity axis numbers positions, not severities",
        "supcon_scale/evaluation/plots.py",
        "xs = [0, *severities]",
        "xs = list(range(len(severities) + 1))",
        ("tests/test_evaluation_robustness.py::test_the_severity_axis_shows_the_severities_scored",),
    ),
    M(
        "stats: McNemar over every image, not the discordant ones",
        "supcon_scale/evaluation/stats.py",
        "p = binomtest(only_a, discordant, 0.5).pvalue if discordant else 1.0",
        "p = binomtest(only_a, len(correct_a), 0.5).pvalue if discordant else 1.0",
        ("tests/test_evaluation_stats.py",),
    ),
    M(
        "knn: k not capped at the smallest class",
        "supcon_scale/evaluation/knn.py",
        "    if k <= smallest:",
        "    if True:",
        ("tests/test_evaluation_knn.py",),
    ),
    M(
        "splits: an extra val class passes",
        "supcon_scale/evaluation/splits.py",
        "    if a != b:",
        "    if set(a) - set(b):",
        ("tests/test_evaluation_knn.py::test_train_and_val_class_lists_are_checked_where_they_meet",),
    ),
    M(
        "linear: features cache never read back",
        "supcon_scale/evaluation/linear.py",
        'cached = load_features(Path(cache_dir) / f"features_{split}.safetensors", key) if cache_dir else None',
        "cached = None",
        ("tests/test_evaluation_linear.py::test_cache_dir_reuses_features_for_the_same_encoder_only",),
    ),
    M(
        "resilience: loader workers die of the preemption signal",
        "supcon_scale/data/torchvision.py",
        "worker_init_fn=ignore_preemption_signals,",
        "worker_init_fn=None,",
        ("tests/test_reliability.py::test_other_preemption_signals_to_the_agent_checkpoint_and_exit_3",),
    ),
    M(
        "corruptions: severity ignored",
        "supcon_scale/evaluation/corruptions.py",
        "out = getattr(mod, corruption)(Image.fromarray(image), severity)",
        "out = getattr(mod, corruption)(Image.fromarray(image), 1)",
        ("tests/test_evaluation_corruptions.py",),
    ),
    M(
        "linear: top-k needs every one of k",
        "supcon_scale/evaluation/linear.py",
        "hit = (logits.topk(kk, dim=1).indices == labels[:, None]).any(dim=1)",
        "hit = (logits.topk(kk, dim=1).indices == labels[:, None]).all(dim=1)",
        ("tests/test_evaluation_linear.py",),
    ),
    # objectives/
    M(
        "genscl: teacher term dropped",
        "supcon_scale/objectives/genscl.py",
        "return self.loss(features, vectors) + self.alpha * self.loss(features, soft)",
        "return self.loss(features, vectors)",
        ("tests/test_objectives.py",),
    ),
    M(
        "mix: label vectors not mixed",
        "supcon_scale/objectives/mix.py",
        "return x, y * lam + y[perm] * (1 - lam), lam, kind",
        "return x, y, lam, kind",
        ("tests/test_mix.py",),
    ),
    M(
        "mix: generator state not restored",
        "supcon_scale/objectives/mix.py",
        "self.generator.set_state(state)",
        "pass",
        ("tests/test_objectives.py",),
    ),
    M(
        "objectives: views laid out view-minor",
        "supcon_scale/objectives/base.py",
        "return out.reshape(views, out.shape[0] // views, -1).transpose(0, 1)",
        "return out.reshape(out.shape[0] // views, views, -1)",
        ("tests/test_objectives.py",),
    ),
    # Issue 28: an augmentation parameter ignored, a resume state not restored, an option dropped, a stream that
    # does not vary, a boundary rounded (tests/test_data_augment_stats.py and the edge tests against references)
    M(
        "augment: torchvision brightness strength dropped",
        "supcon_scale/data/torchvision.py",
        "v2.ColorJitter(b, c, s, h)",
        "v2.ColorJitter(0.0, c, s, h)",
        (
            "tests/test_data_augment_stats.py::test_each_jitter_strength_draws_its_uniform_factor[brightness-torchvision]",
        ),
    ),
    M(
        "augment: torchvision RandAugment magnitude left at its default",
        "supcon_scale/data/torchvision.py",
        "magnitude=spec.randaugment_m, ",
        "",
        ("tests/test_data_augment_stats.py::test_randaugment_matches_the_libraries_own_at_n_and_m[1-24-torchvision]",),
    ),
    M(
        "augment: DALI saturation strength dropped",
        "supcon_scale/data/dali.py",
        "fn.saturation(x, saturation=factor(saturation))",
        "fn.saturation(x, saturation=1.0)",
        ("tests/test_data_augment_stats.py::test_each_jitter_strength_draws_its_uniform_factor[saturation-dali]",),
    ),
    M(
        "augment: DALI blur sigma range ignored",
        "supcon_scale/data/dali.py",
        "sigma=_uniform(*spec.blur_sigma)",
        "sigma=_uniform(0.1, 2.0)",
        ("tests/test_data_augment_stats.py::test_dali_blur_sigma_is_uniform_over_its_range",),
    ),
    M(
        "resume: DALI checkpoint not restored",
        "supcon_scale/data/dali.py",
        "self._checkpoint = bytes(blob.numpy().tobytes()) if has_blob and same_world else None",
        "self._checkpoint = None",
        ("tests/test_data_dali.py::test_one_pipeline_serves_every_epoch_and_resumes_exactly_at_an_epoch_end",),
    ),
    M(
        "stream: a sample's views ignore the epoch",
        "supcon_scale/data/torchvision.py",
        "torch.manual_seed(sample_seed(self.seed, epoch, i, draw))",
        "torch.manual_seed(sample_seed(self.seed, 0, i, draw))",
        (
            "tests/test_data_torchvision.py",
            "tests/test_data.py",
            "tests/test_streams.py::test_epochs_draw_different_views",
        ),
    ),
    M(
        "stream: DALI random stream ignores the rank",
        "supcon_scale/data/dali.py",
        "distributed.rank_seed(self.seed, self.ctx.rank, origin // self.steps_per_epoch)",
        "distributed.rank_seed(self.seed, 0, origin // self.steps_per_epoch)",
        ("tests/test_data_dali.py",),
    ),
    M(
        "robustness: resized ImageNet-C view normalised with ImageNet's mean/std",
        "supcon_scale/evaluation/robustness.py",
        "transform = eval_transform(image_size, *norm) if resize",
        "transform = eval_transform(image_size) if resize",
        ("tests/test_evaluation_robustness_edges.py::test_corrupted_images_are_normalised_with_the_runs_mean_and_std",),
    ),
    M(
        "robustness: ImageNet-C resize side truncated",
        "supcon_scale/evaluation/c_dataset.py",
        "v2.Resize(round(image_size / 0.875), antialias=True)",
        "v2.Resize(int(image_size / 0.875), antialias=True)",
        ("tests/test_evaluation_robustness_edges.py::test_imagenet_c_geometry_is_the_reference_transform",),
    ),
    M(
        "mix: CutMix box side truncated",
        "supcon_scale/objectives/mix.py",
        "cut_h, cut_w = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)",
        "cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)",
        ("tests/test_objectives_mix_cutmix.py", "tests/test_mix.py"),
    ),
    # config.py
    # config/
    M(
        "config: non-finite floats accepted",
        "supcon_scale/config/keys.py",
        "if math.isnan(x) or (math.isinf(x) and not (self.inf and x > 0)):",
        "if False:",
        ("tests/test_config_schema.py",),
    ),
    M(
        "config: batch vs world size not checked",
        "supcon_scale/config/checks.py",
        "if world_size is not None and cfg.data.global_batch_size % world_size:",
        "if False:",
        ("tests/test_config.py",),
    ),
    # models.py and trainer.py
    M(
        "models: embeddings not normalised",
        "supcon_scale/models.py",
        "return F.normalize(out.float(), dim=-1) if self.normalize else out",
        "return out",
        ("tests/test_models.py",),
    ),
    M(
        "trainer: the run's seed not applied to numpy and random",
        "supcon_scale/trainer.py",
        "seed_everything(cfg.seed)  # the same",
        "torch.manual_seed(cfg.seed)  # the same",
        ("tests/test_trainer.py::test_resume_after_epoch_one_matches_uninterrupted",),
    ),
    M(
        "trainer: batch-norm statistics kept after a skipped step",
        "supcon_scale/trainer.py",
        "torch._foreach_copy_(buffers, shadow)",
        "pass",
        ("tests/test_gpu_ready.py::test_skipped_step_restores_batch_norm_statistics_exactly",),
    ),
]


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache", "*.egg-info", "build")
    shutil.copytree(REPO, dst, ignore=ignore, dirs_exist_ok=True)


def _run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    """(killed, the last lines of the output): killed when pytest reports a failure or an error."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, "timed out (a hang counts as caught)"
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode != 0, tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="run only the mutations whose name contains one of these")
    p.add_argument("--json", type=Path, help="write the per-mutation results here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's tests (default 600)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:60s} {m.path}")
        return 0
    results = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="supcon-mutation-") as tmp:
        root = Path(tmp)
        _copy(root)
        for i, m in enumerate(chosen, 1):
            target = root / m.path
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                status, tail = "stale", f"snippet found {count} times in {m.path}"
            else:
                target.write_text(original.replace(m.old, m.new))
                t0 = time.time()
                killed, tail = _run_tests(root, m.tests, args.timeout)
                target.write_text(original)
                status = "killed" if killed else ("equivalent" if m.why_equivalent else "survived")
                tail = f"{time.time() - t0:.0f}s | {tail}"
            results.append(
                {
                    "name": m.name,
                    "path": m.path,
                    "status": status,
                    "tests": list(m.tests),
                    "detail": tail,
                    "why_equivalent": m.why_equivalent,
                }
            )
            print(f"[{i}/{len(chosen)}] {status:10s} {m.name}", flush=True)
    counted = [r for r in results if r["status"] in ("killed", "survived")]
    killed = sum(r["status"] == "killed" for r in counted)
    rate = killed / len(counted) if counted else float("nan")
    print(
        f"\nkilled {killed} of {len(counted)} mutations ({100 * rate:.1f}%) in {time.time() - start:.0f} s; "
        f"{sum(r['status'] == 'equivalent' for r in results)} equivalent, "
        f"{sum(r['status'] == 'stale' for r in results)} stale"
    )
    for r in results:
        if r["status"] != "killed":
            print(f"  {r['status']}: {r['name']} ({r['path']}): {r['why_equivalent'] or r['detail']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"kill_rate": rate, "results": results}, indent=2))
    stale = any(r["status"] == "stale" for r in results)
    return 0 if rate >= 0.9 and not stale else 1


if __name__ == "__main__":
    sys.exit(main())
