"""Tokenization and deterministic batching, in numpy.

Every batch has the same shape (padding to ``max_length``, dropping the last
partial train batch, padding the last eval batch) so the jitted step compiles
once. The train batch of global step ``s`` is a function of ``(seed, s)``
alone: epoch ``e = s // steps_per_epoch`` is a fixed permutation seeded by
``[seed, e]``. Resuming at step ``s`` therefore replays exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint.
Batch sizes are global; each process takes its contiguous share of rows.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from train.errors import DataError

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encode(
    tokenizer, columns: Mapping[str, list], text_keys: Sequence[str], max_length: int, chunk_size: int = 4096
) -> dict[str, np.ndarray]:
    """Tokenize a split to fixed-shape int32 arrays plus ``labels``.

    Pairs are truncated longest-first and padded on the right, which the
    fused attention relies on. ``labels`` is float32 when the label column
    holds floats (STS-B regression), else int32. Tokenizing in chunks
    bounds peak memory on the large tasks (QQP, MNLI).
    """
    texts = [list(columns[k]) for k in text_keys]
    n = len(texts[0])
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, chunk_size):
        chunk = [t[start : start + chunk_size] for t in texts]
        enc = tokenizer(
            *chunk,
            truncation=True,
            padding="max_length",
            max_length=max_length,
            padding_side="right",
            return_tensors="np",
        )
        for key in _MODEL_INPUTS:
            if key in enc:
                out.setdefault(key, np.empty((n, max_length), np.int32))[start : start + len(chunk[0])] = enc[key]
    labels = np.asarray(columns["label"])
    out["labels"] = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A split tokenized once, unpadded: each model input's tokens end to end, with row offsets.

    `batch` pads any rows to any length exactly as `encode` would (right padding with the tokenizer's pad ids,
    mask 0), so a run tokenizes each split once instead of once per step or per evaluation, and the host
    knows every row's length (its batches' shapes) before the first step. About 4 bytes per real token.
    """

    tokens: dict[str, np.ndarray]  # model input -> int32 (total tokens,)
    offsets: np.ndarray  # int64 (rows + 1,)
    labels: np.ndarray | None  # one per row, or None (`ragged_rows`: a batch then has no labels)
    pad: dict[str, int]  # model input -> its padding value
    max_length: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, rows: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
        """Rows ``rows`` padded to ``length`` (default max_length) tokens, plus ``labels`` where there are any."""
        length = self.max_length if length is None else length
        starts, ends = self.offsets[rows], self.offsets[np.asarray(rows) + 1]
        sizes = ends - starts
        if sizes.size and sizes.max() > length:
            raise ValueError(f"a row holds {sizes.max()} tokens, more than the batch length {length}")
        # The flat positions of every real token, and where each lands in the (rows, length) batch.
        within = np.arange(length)[None, :]
        real = within < sizes[:, None]
        source = (starts[:, None] + within)[real]
        out = {}
        for key, flat in self.tokens.items():
            values = np.full((len(sizes), length), self.pad[key], np.int32)
            values[real] = flat[source]
            out[key] = values
        out["attention_mask"] = real.astype(np.int32)
        if self.labels is not None:
            out["labels"] = self.labels[rows]
        return out


def encode_ragged(
    tokenizer, columns: Mapping[str, list], text_keys: Sequence[str], max_length: int, chunk_size: int = 4096
) -> Encoded:
    """`encode`'s tokens without the padding: truncated longest-first to ``max_length``, as `Encoded`."""
    texts = [list(columns[k]) for k in text_keys]
    n = len(texts[0])
    pieces: dict[str, list[np.ndarray]] = {}
    lengths = np.zeros(n, np.int64)
    for start in range(0, n, chunk_size):
        chunk = [t[start : start + chunk_size] for t in texts]
        enc = tokenizer(*chunk, truncation=True, padding=False, max_length=max_length)
        lengths[start : start + len(chunk[0])] = [len(ids) for ids in enc["input_ids"]]
        for key in _MODEL_INPUTS:
            if key in enc and key != "attention_mask":
                flat = np.fromiter((t for ids in enc[key] for t in ids), np.int32)
                pieces.setdefault(key, []).append(flat)
    tokens = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in pieces.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pad = {"input_ids": pad_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    labels = np.asarray(columns["label"])
    labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Encoded(tokens, offsets, labels, {k: pad[k] for k in tokens}, max_length)


def choose_buckets(
    longest: Sequence[int], max_length: int, tolerance: float = 0.05, multiple: int = 16, limit: int = 8
) -> tuple[int, ...]:
    """The fewest length buckets that pad batches whose longest rows are ``longest`` to within ``tolerance`` of
    the tokens each would hold at its own length (rounded up to ``multiple``), then ``max_length``.

    Each extra bucket costs a compile of every step program (ahead of the loop, cached across runs); each
    padded token costs every step. Within a bucket count the set is optimal (dynamic programming over the
    candidate lengths): on GLUE's STS-B at batch 32 it picks 64, 80, 96 and 128, where powers of two give 64
    and 128 with 38 % more padded tokens.
    """
    if len(longest) == 0:
        return (max_length,)
    rounded = np.minimum(-(-np.asarray(longest, np.int64) // multiple) * multiple, max_length)
    values, counts = np.unique(rounded, return_counts=True)
    floor = float((values * counts).sum())  # every batch at its own (rounded) length
    n = len(values)
    # cost[k][j]: the fewest tokens covering values[:j + 1] with k buckets, the last at values[j].
    inf = float("inf")
    cost = np.full((min(limit, n) + 1, n), inf)
    choice = np.zeros_like(cost, dtype=np.int64)
    below = np.concatenate([[0], np.cumsum(counts)])  # batches with values[:j]
    for j in range(n):
        cost[1, j] = values[j] * below[j + 1]
    for k in range(2, cost.shape[0]):
        for j in range(k - 1, n):
            options = [cost[k - 1, i] + values[j] * (below[j + 1] - below[i + 1]) for i in range(k - 2, j)]
            best = int(np.argmin(options))
            cost[k, j], choice[k, j] = options[best], best + k - 2
    for k in range(1, cost.shape[0]):
        if cost[k, n - 1] <= floor * (1 + tolerance) or k == cost.shape[0] - 1:
            picked, j = [], n - 1
            for kk in range(k, 0, -1):
                picked.append(int(values[j]))
                j = choice[kk, j]
            return tuple(sorted(set(picked) | {max_length}))
    raise AssertionError("unreachable")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full train batches per epoch (the last partial batch is dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise DataError(f"batch size {batch_size} exceeds the {num_examples} training examples; lower --batch-size")
    return steps


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Example order of one epoch; cached since every step of the epoch needs it."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Example indices of global train step ``step`` (0-based)."""
    epoch, i = divmod(step, steps_per_epoch(num_examples, batch_size))
    return epoch_permutation(num_examples, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def step_rows(num_examples: int, batch_size: int, grad_accum: int, seed: int, step: int) -> np.ndarray:
    """Example indices of global step ``step`` with ``grad_accum`` micro-batches of ``batch_size``: (B,), or
    (B, N) whose column j is micro-batch j."""
    rows = train_batch_indices(num_examples, batch_size * grad_accum, seed, step)
    return rows if grad_accum == 1 else rows.reshape(grad_accum, batch_size).T


def shard_for_process(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous, equal share of a global batch's rows."""
    if len(indices) % process_count:
        raise DataError(
            f"global batch size {len(indices)} is not divisible by the {process_count} processes; "
            "pick a batch size that is"
        )
    per = len(indices) // process_count
    return indices[process_index * per : (process_index + 1) * per]


def bucket_lengths(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    out = []
    length = smallest
    while length < max_length:
        out.append(length)
        length *= 2
    return (*out, max_length)


def fit_bucket(buckets: Sequence[int], longest: int) -> int:
    """The smallest of ``buckets`` (ascending) that holds ``longest`` tokens."""
    return next(b for b in buckets if b >= longest)


def trim_to_bucket(batch: Mapping[str, np.ndarray], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Cuts right padding down to the smallest bucket that holds the batch's longest example.

    Real tokens are untouched, so results equal those at full length, while
    short-sentence tasks (SST-2) run several times faster. The step compiles
    once per bucket, a handful of times at most.
    """
    length = fit_bucket(buckets, int(batch["attention_mask"].sum(axis=1).max()))
    return {k: v[:, :length] if v.ndim == 2 and k in _MODEL_INPUTS else v for k, v in batch.items()}


def drop_full_mask(batch: dict[str, np.ndarray], process_count: int) -> dict[str, np.ndarray]:
    """``batch`` without "attention_mask" when that mask is all ones and there is one process, else ``batch``.

    A batch without the key has no padding: the fused attention then runs with no mask
    (`train.methods.Method.apply`), cuDNN's fastest form, and HF's own attention builds
    the ones itself. With several processes each sees only its own rows while all must
    run one compiled program, so the mask stays. For train batches only: eval and
    calibration code reads the mask. The new batch structure makes ``jax.jit`` compile a
    second variant of the step.
    """
    mask = batch.get("attention_mask")
    if process_count > 1 or mask is None or not mask.all():
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def steps_by_shape(
    lengths: np.ndarray, batch_size: int, seed: int, total_steps: int, buckets: Sequence[int]
) -> list[int]:
    """One train step for each (bucket, full mask) pair that ``total_steps`` steps meet, ``lengths`` being
    each example's tokens: the steps whose batches show every train shape of a run, found in numpy (a
    GLUE run of 100k steps takes well under a second)."""
    return steps_by_shapes([lengths], [buckets], batch_size, seed, total_steps)


def distinct_shapes(batches, rows: int) -> list[dict]:
    """One ``jax.ShapeDtypeStruct`` batch of ``rows`` global rows per distinct structure among host
    ``batches`` (dicts of arrays), in first-seen order."""
    import jax

    out: dict[tuple, dict] = {}
    for batch in batches:
        key = tuple(sorted((k, v.shape[1:], str(v.dtype)) for k, v in batch.items()))
        if key not in out:
            out[key] = {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in batch.items()}
    return list(out.values())


def eval_rows(num_examples: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, weights)`` of fixed-size global eval batches covering each example once.

    The last batch is filled by repeating the final example (so attention
    masks are never all zero) with weight 0, so metrics count every example
    once. Each process then takes its `shard_for_process` of the rows.
    """
    if num_examples == 0:
        raise DataError("the eval split is empty; check the data directory")
    for start in range(0, num_examples, batch_size):
        rows = np.arange(start, start + batch_size)
        yield np.minimum(rows, num_examples - 1), (rows < num_examples).astype(np.float32)


def select(columns: Mapping[str, Sequence], rows: np.ndarray) -> dict[str, list]:
    """Rows ``rows`` of raw (untokenized) columns."""
    return {k: [v[i] for i in rows] for k, v in columns.items()}


BAR_ROWS = 10_000  # a split of at least this many rows is tokenized under a progress bar


def chunked(items: Sequence, size: int, desc: str, progress: bool = False) -> Iterator[Sequence]:
    """``items`` in consecutive slices of ``size``, with a tqdm bar (shown when ``progress``) that counts an item
    once the caller is done with its slice: the tokenizing loops of the LLM and summarization jobs."""
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit="ex", disable=not progress) as bar:
        for first in range(0, len(items), size):
            part = items[first : first + size]
            yield part
            bar.update(len(part))


def ragged_rows(chunks: Iterable[Sequence[Sequence[int]]], key: str, pad: int, max_length: int) -> Encoded:
    """Token-id rows, given chunk by chunk, end to end as an `Encoded` of the one input ``key`` (padded with
    ``pad``) without labels. Each chunk's Python lists are dropped once flattened, so a large split never
    holds all of its tokens as Python ints."""
    flats, lengths = [], []
    for rows in chunks:
        sizes = np.fromiter(map(len, rows), np.int64, len(rows))
        flats.append(np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(sizes.sum())))
        lengths.append(sizes)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    return Encoded({key: flat}, np.concatenate([[0], np.cumsum(lengths)]), None, {key: pad}, max_length)


def steps_by_shapes(
    lengths: Sequence[np.ndarray], buckets: Sequence[Sequence[int]], batch_size: int, seed: int, total_steps: int
) -> list[int]:
    """`steps_by_shape` for examples of several sequences (a seq2seq source and target): ``lengths[i]`` holds
    each example's tokens of sequence i, padded to a bucket of ``buckets[i]``. One step for each combination
    of every sequence's (bucket, full) that ``total_steps`` steps meet, found in numpy."""
    per_epoch = steps_per_epoch(len(lengths[0]), batch_size)
    bucket_arrays = [np.asarray(b) for b in buckets]
    seen: dict[tuple, int] = {}
    for epoch in range(-(-total_steps // per_epoch)):
        steps = min(per_epoch, total_steps - epoch * per_epoch)
        rows = epoch_permutation(len(lengths[0]), seed, epoch)[: steps * batch_size].reshape(steps, batch_size)
        columns = []
        for sequence, bucket_array in zip(lengths, bucket_arrays):
            batch_lengths = np.asarray(sequence)[rows]
            bucket = bucket_array[np.searchsorted(bucket_array, batch_lengths.max(axis=1))]
            columns += [bucket, batch_lengths.min(axis=1) == bucket]
        for i, key in enumerate(zip(*(c.tolist() for c in columns))):
            seen.setdefault(key, epoch * per_epoch + i)
    return sorted(seen.values())
