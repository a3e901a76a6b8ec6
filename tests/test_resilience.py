"""resilience.NonFiniteGuard: what counts as a bad step, and the fp16 calibration exemption."""

from __future__ import annotations

import pytest
import torch

from supcon_scale.resilience import NonFiniteError, NonFiniteGuard

NAN, FINITE = torch.tensor(float("nan")), torch.tensor(1.5)


def test_skipped_steps_in_a_row_stop_the_run_and_a_good_step_resets_the_count():
    guard = NonFiniteGuard(max_bad=3, fp16=False)
    guard.update(1, NAN, False, None)
    guard.update(2, NAN, False, None)
    guard.update(3, FINITE, True, None)  # a good step: the count starts again
    guard.update(4, NAN, False, "ckpt")
    guard.update(5, NAN, False, "ckpt")
    with pytest.raises(NonFiniteError, match="step 6: 3 non-finite steps in a row .* newest good checkpoint: ckpt"):
        guard.update(6, NAN, False, "ckpt")
    assert guard.total == 5


def test_fp16_scaler_calibration_skips_are_not_failures():
    """fp16: a skipped step with a finite loss is the loss scaler backing off, not a failure; a NaN loss still is."""
    guard = NonFiniteGuard(max_bad=2, fp16=True)
    for step in range(1, 10):
        guard.update(step, FINITE, False, None)
    assert guard.total == 0
    guard.update(10, NAN, False, None)
    with pytest.raises(NonFiniteError):
        guard.update(11, NAN, False, None)
    without = NonFiniteGuard(max_bad=2, fp16=False)
    without.update(1, FINITE, False, None)
    with pytest.raises(NonFiniteError):  # bf16/fp32 have no scaler: any skipped step is a bad one
        without.update(2, FINITE, False, None)


@pytest.mark.parametrize(
    "argv, asks",
    [
        (["--help"], True),
        (["--nproc-per-node", "2", "-h"], True),
        (["--nproc-per-node", "2", "-m", "supcon_scale.cli", "train", "--help"], False),  # the script's help
        (["train.py", "--help"], False),
        (["--standalone", "-m", "x"], False),
    ],
)
def test_torchrun_help_is_asked_only_before_the_entrypoint(argv, asks):
    from supcon_scale.resilience import _asks_help

    assert _asks_help(argv) is asks


def test_torchrun_help_explains_exit_3_then_prints_torchruns_own(tmp_path):
    import subprocess
    import sys

    from supcon_scale.resilience import EXIT_PREEMPTED

    proc = subprocess.run(
        [sys.executable, "-m", "supcon_scale.cli", "torchrun", "--help"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ours, _, theirs = proc.stdout.partition("usage:")
    assert f"\n  {EXIT_PREEMPTED}  the job was preempted" in ours and "requeue" in ours
    assert "--nproc-per-node" in theirs and "--max-restarts" in theirs  # torchrun's own help follows
