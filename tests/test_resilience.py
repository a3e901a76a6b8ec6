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
