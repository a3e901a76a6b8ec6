"""Class-balanced epochs (`data.sampler=m_per_class`): every global batch holds m images of each of B/m classes.

The batches of pytorch-metric-learning's `MPerClassSampler(labels, m, batch_size)` (m per class, batch_size a
multiple of m), built as an epoch plan (`sharding.BalancedPlan`, an `EpochPlan`): the global order is a function of
(seed, epoch) and the labels only, and the ranks split it as they split the random order, so resume and elastic
resume continue it exactly. What one epoch is (docs/DESIGN.md, "Data"):

- as many global batches as the random sampler's epoch: `N // B` with `data.drop_last`, else `ceil(N / B)`; every
  batch is full (B samples), so without drop_last an epoch holds up to B - 1 more samples than N;
- classes: B/m distinct classes per batch, in rounds: each round visits every class once in a random order, so over
  an epoch the classes' appearance counts differ by at most one (pytorch-metric-learning draws the classes of each
  batch independently; these rounds keep its uniform class weights with less spread);
- images: each class hands out its images without replacement in a random order, reshuffled when exhausted, never
  the same image twice in one batch; over an epoch a class in k batches uses m * k images, each image
  floor(m k / n) or ceil(m k / n) times (n its images). Classes weigh the same whatever their size: on a balanced
  dataset every image is used about once per epoch; on an imbalanced one a large class leaves images out of the
  epoch (others next epoch: the order is drawn anew) and a small class repeats its images.
"""

from __future__ import annotations

import numpy as np

# The streams of an epoch: the classes' rounds and the images' draws, apart so the synthetic backend shares the first.
_CLASSES, _IMAGES = 0, 1
_TAG = 0xBA1


def distinct_groups(rng: np.random.Generator, items: np.ndarray, group: int, count: int) -> np.ndarray:
    """`count` groups of `group` distinct items [count, group]: consecutive draws from rounds of random permutations.

    Each round uses every item once. Where a group straddles two rounds, the next round's first items are its first
    ones that the group does not hold yet (moved to the round's front), so no group repeats an item.
    """
    n, total = len(items), group * count
    assert 0 < group <= n, (group, n)
    out = np.empty(total, dtype=items.dtype)
    pos = 0
    while pos < total:
        perm = items[rng.permutation(n)]
        held = pos % group  # items of the current group drawn from the previous round (all of one round: n >= group)
        if held:
            fresh = np.flatnonzero(~np.isin(perm, out[pos - held : pos]))[: group - held]
            front = np.zeros(n, dtype=bool)
            front[fresh] = True
            perm = np.concatenate([perm[front], perm[~front]])
        take = min(n, total - pos)
        out[pos : pos + take] = perm[:take]
        pos += take
    return out.reshape(count, group)


def class_batches(seed: int, epoch: int, classes: np.ndarray, per_batch: int, steps: int) -> np.ndarray:
    """The classes of each global batch of the epoch [steps, per_batch] (distinct in a row, rounds over `classes`)."""
    rng = np.random.default_rng([seed, epoch, _TAG, _CLASSES])
    return distinct_groups(rng, np.asarray(classes), per_batch, steps)


def check_balance(m: int, global_batch: int, class_sizes: dict[int, int]) -> None:
    """Refuse what cannot give m images of B/m distinct classes per batch, naming the key (one line)."""
    if global_batch % m:
        raise ValueError(f"data.m_per_class={m} does not divide data.global_batch_size={global_batch}")
    if not class_sizes:
        raise ValueError("data.sampler=m_per_class: the training split holds no labelled image")
    small, count = min((n, c) for c, n in class_sizes.items())
    if m > small:
        raise ValueError(
            f"data.m_per_class={m} exceeds the {small} image(s) of class {count}, the smallest "
            "(a batch would repeat an image)"
        )
    if global_batch // m > len(class_sizes):
        raise ValueError(
            f"data.global_batch_size={global_batch} / data.m_per_class={m} = {global_batch // m} classes per batch, "
            f"but the training split has {len(class_sizes)} classes with images"
        )


def balanced_order(seed: int, epoch: int, labels: np.ndarray, m: int, global_batch: int, steps: int) -> np.ndarray:
    """The epoch's global order [steps * global_batch]: batch after batch, m consecutive images of each of its
    classes; a function of (seed, epoch, labels) only, the same on every world size."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    slots = class_batches(seed, epoch, present, global_batch // m, steps).ravel()
    rng = np.random.default_rng([seed, epoch, _TAG, _IMAGES])
    by_class = np.argsort(labels, kind="stable")  # sample indices grouped by class
    starts = np.searchsorted(labels[by_class], present)
    ends = np.append(starts[1:], len(labels))
    by_slot = np.argsort(slots, kind="stable")  # the class slots grouped by class, in batch order
    slot_starts = np.searchsorted(slots[by_slot], present)
    slot_ends = np.append(slot_starts[1:], len(slots))
    out = np.empty((len(slots), m), dtype=np.int64)
    for c in range(len(present)):
        mine = by_slot[slot_starts[c] : slot_ends[c]]
        if len(mine):
            out[mine] = distinct_groups(rng, by_class[starts[c] : ends[c]], m, len(mine))
    return out.ravel()


def earlier_uses(order: np.ndarray) -> np.ndarray:
    """For each position of `order`, how often its sample came earlier in it (0 at its first use)."""
    by_sample = np.argsort(order, kind="stable")
    sorted_ = order[by_sample]
    first = np.searchsorted(sorted_, sorted_)  # where each sample's run of uses begins
    uses = np.empty(len(order), dtype=np.int64)
    uses[by_sample] = np.arange(len(order)) - first
    return uses
