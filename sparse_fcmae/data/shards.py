"""WebDataset shards (``data=webdataset``): tar files of samples read as streams, split across processes and
DataLoader workers, seeded per (seed, epoch) and resumable at the exact sample.

The order, for one epoch: the shard list is permuted with ``(seed, epoch, pass)``; process ``r`` of ``R`` takes
every R-th shard of it and its stream ``w`` of ``W`` (one per DataLoader worker) every W-th of those, so
streams never share a shard. A stream reads its shards (webdataset's ``tarfile_to_samples``), then the next
pass's, for as long as the epoch needs, through webdataset's ``shuffle`` buffer with its own seeded RNG.
DataLoader takes batch ``k`` from worker ``k mod W``; so a run stopped after ``m`` micro-batches resumes
with stream ``s`` skipping the samples of its batches below ``m`` (read, never decoded) and worker ``w``
playing stream ``(w + m) mod W``: the batches that follow are the ones the uninterrupted run sees.
A sample that does not decode is replaced by the next readable one of its stream and counted, as a bad file in
an image folder is (so one stream position is one sample, whatever is corrupt, and resume stays exact).

Fine-tuning (``labels=True``) adds each sample's class index, its ``.cls`` member; a sample without one, or with one
that is no integer in ``[0, num_classes)``, is an error naming it (a dataset to fix, never a sample to skip).
``once=True`` (evaluation, linear probing's feature cache) reads every sample exactly once: worker ``w`` reads the
listed shards ``w, w + W, ...`` in order, no shuffle, no further pass, and a corrupt sample becomes a placeholder
(label -1, skipped 1) that the caller drops, so nothing is read twice.
"""
from __future__ import annotations

import itertools
import pathlib
import random
import sys
import tarfile

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import NpyLayoutError, load_image_chw
from .folders import IMAGE_EXTENSIONS
from .order import sample_seed, seeded_rngs
from .transforms import _fcmae_transform

# a sample's image member: the first of these keys it has (webdataset keys are extensions without the dot)
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


class ShardLabelError(ValueError):
    """A sample's ``.cls`` is missing or no class index of ``data.num_classes``: stop, naming the sample."""


def shard_urls(urls) -> list[str]:
    """``data.urls``: a brace pattern (``train-{000000..000999}.tar``) or a list of them, expanded by webdataset;
    local shards must exist."""
    from webdataset.shardlists import expand_urls

    if not urls:
        raise ValueError("data=webdataset needs data.urls='/path/train-{000000..000099}.tar' (quoted) or a list")
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for u in expand_urls(str(p))]
    for u in out:
        if _is_local(u) and not pathlib.Path(u).is_file():
            raise FileNotFoundError(f"shard not found: {u} (data.urls)")
    return out


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_samples(urls: list[str]) -> int:
    """Samples in local shards (tar headers only, grouped by key as webdataset groups them)."""
    from webdataset.tariterators import base_plus_ext

    n = 0
    for url in urls:
        if not _is_local(url):
            raise ValueError(f"cannot count the samples of {url} (not a local file): set data.epoch_size")
        last = None
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    key = base_plus_ext(member.name)[0] if member.isreg() else None
                    if key is not None and key != last and not key.startswith("__"):
                        n, last = n + 1, key
        except (tarfile.TarError, OSError) as e:  # counted up to the damage; reading skips it the same way
            print(f"warning: unreadable shard {url} (counted up to the damage): {e}", file=sys.stderr)
    return n


def _batches_of_stream(batches: int, stream: int, streams: int) -> int:
    """How many of the first ``batches`` micro-batches stream ``stream`` yields (DataLoader's round robin)."""
    return max(0, (batches - stream + streams - 1) // streams)


class ShardStream(IterableDataset):
    """The samples of ``urls`` as ``(image, skipped)``, as ``SeededSamples`` gives them for image folders.

    ``plan`` fixes the epoch's shape (batch, micro-batches per process, processes, this rank, streams), then
    ``set_epoch(epoch, start)`` before each epoch: ``start`` micro-batches of it are already trained.
    """

    MAX_WARNINGS = 10

    def __init__(self, urls, img_size: int, in_chans: int = 3, seed: int = 0, epoch_size: int | None = None,
                 shuffle_buffer: int = 1000, crop_scale=(0.2, 1.0), npy_layout: str = "auto",
                 augment: dict | None = None, train: bool = True, labels: bool = False, num_classes: int | None = None,
                 once: bool = False):
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be an integer >= 0 (0: no shuffle buffer), got {shuffle_buffer!r}")
        if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1):
            raise ValueError(f"data.epoch_size must be an integer >= 1 or null (counted), got {epoch_size!r}")
        self.urls = shard_urls(urls)
        self.in_chans, self.npy_layout, self.seed, self.shuffle_buffer = in_chans, npy_layout, seed, shuffle_buffer
        self.transform = _fcmae_transform(img_size, in_chans, train, crop_scale, **(augment or {}))
        self.img_size, self.labels, self.once = img_size, labels, once
        self.num_classes = num_classes if labels else 1  # pretraining reads images only (a sample's .cls is not used)
        if once:  # every sample once: counted when the shards are local (only reported), else unknown
            self.num_images = count_samples(self.urls) if all(_is_local(u) for u in self.urls) else None
        else:
            self.num_images = epoch_size if epoch_size is not None else count_samples(self.urls)  # remote: no reading
        self._check_one_readable()
        self.epoch, self.start = 0, 0
        self.plan(batch_size=1, batches=self.num_images, world_size=1, rank=0, streams=1)
        self._warnings = torch.zeros(1, dtype=torch.int32).share_memory_()  # one count for all workers
        self._head = None

    def plan(self, batch_size: int, batches: int, world_size: int, rank: int, streams: int) -> None:
        """Each epoch: ``batches`` micro-batches of ``batch_size`` on each of ``world_size`` processes, read by
        ``streams`` streams per process (the DataLoader workers, or 1)."""
        if len(self.urls) < world_size * streams and not self.once:
            raise ValueError(f"data.urls has {len(self.urls)} shard(s), fewer than processes x loader workers "
                             f"({world_size} x {streams}): each reads its own shards; use more shards or "
                             "fewer data.num_workers")
        self.batch_size, self.batches, self.world_size, self.rank, self.streams = (batch_size, batches, world_size,
                                                                                   rank, streams)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    # ---- reading --------------------------------------------------------------------------------------
    def _shards(self, stream: int, cycle: int) -> list[str]:
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(self.urls))
        return [self.urls[i] for i in order[self.rank::self.world_size][stream::self.streams]]

    def _raw(self, stream: int):
        """The stream's raw samples (dicts of bytes), shard pass after shard pass, each pass through the shuffle
        buffer (emptied at its end: a pass never mixes with the next, so an epoch of one pass reads each sample once)."""
        import webdataset as wds

        rng = random.Random(f"shuffle-{self.seed}-{self.epoch}-{self.rank}-{stream}")  # str seeds: hash-seed proof
        for cycle in itertools.count():
            samples = wds.tarfile_to_samples(handler=self._bad_shard)({"url": u} for u in self._shards(stream, cycle))
            if self.shuffle_buffer:
                samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(iter(samples))
            n = 0
            for sample in samples:
                n += 1
                yield sample
            if n == 0:
                raise ValueError(f"the shards of data.urls hold no samples (stream {stream}, pass {cycle})")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.once:
            yield from self._once(worker, workers)
            return
        if workers != self.streams:
            raise RuntimeError(f"the loader has {workers} worker(s), the plan {self.streams} stream(s)")
        stream = (worker + self.start) % self.streams
        done = _batches_of_stream(self.start, stream, self.streams) * self.batch_size
        total = _batches_of_stream(self.batches, stream, self.streams) * self.batch_size
        raw = enumerate(self._raw(stream))
        first = (self.rank * self.streams + stream) << 40  # the stream's sample ids: distinct across streams
        yield from itertools.islice(self._decoded(itertools.islice(raw, done, None), first), total - done)

    def _once(self, worker: int, workers: int):
        """Every sample of this worker's shards once, in listed order; a sample's augmentation is seeded by its shard
        and position in it (whatever the number of workers)."""
        import webdataset as wds

        for i in range(worker, len(self.urls), workers):
            raw = wds.tarfile_to_samples(handler=self._bad_shard)([{"url": self.urls[i]}])
            yield from self._decoded(enumerate(raw), i << 40)

    def _decoded(self, raw, first: int):
        """``(image[, label], skipped)`` per raw sample: a corrupt one is replaced by the next readable one (skipped=1),
        or, reading once, by a placeholder (label -1, skipped=1)."""
        pending = []
        for pos, sample in raw:
            try:
                img = self._decode(sample)
            except NpyLayoutError:
                raise
            except Exception as e:  # corrupt, truncated, no image member: skip it, keep training
                self._warn(sample, e)
                if self.once:
                    yield self._placeholder()
                    continue
                pending.append(pos)
                if len(pending) > 10_000:
                    raise RuntimeError(f"10000 unreadable samples in a row in data.urls (last: {self._name(sample)})") from None
                continue
            label = self._label(sample) if self.labels else None  # outside the try: never skipped
            for p in pending + [pos]:
                with seeded_rngs(sample_seed(self.seed, self.epoch, first + p)):
                    out = self.transform(img)
                yield (out, label, int(p != pos)) if self.labels else (out, int(p != pos))
            pending = []

    def _placeholder(self):
        img = torch.zeros(self.in_chans, self.img_size, self.img_size)
        return (img, -1, 1) if self.labels else (img, 1)

    def _label(self, sample: dict) -> int:
        """The sample's class index: its ``.cls`` member (an integer as text, as webdataset writes it)."""
        raw, name = sample.get("cls"), self._name(sample)
        if raw is None:
            members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise ShardLabelError(f"sample {name} has no .cls member (it has: {members}): fine-tuning needs a class "
                                  "index in every sample")
        try:
            y = int(raw.decode() if isinstance(raw, bytes) else raw)
        except (ValueError, UnicodeDecodeError):
            raise ShardLabelError(f"sample {name}: .cls must be an integer class index, got {raw[:20]!r}") from None
        if not 0 <= y < self.num_classes:
            raise ShardLabelError(f"sample {name}: label {y} is out of range for data.num_classes={self.num_classes} "
                                  f"(labels 0..{self.num_classes - 1})")
        return y

    def _decode(self, sample: dict) -> torch.Tensor:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise ValueError(f"no image member (.{', .'.join(IMAGE_KEYS[:5])}, ...); it has: {members}")
        return load_image_chw(f"{self._name(sample)}.{key}", self.in_chans, self.npy_layout, data=sample[key])

    @staticmethod
    def _name(sample: dict) -> str:
        return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"

    def _warn(self, sample: dict, e: Exception) -> None:
        self._warnings += 1
        if int(self._warnings) <= self.MAX_WARNINGS:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"warning: skipping unreadable sample {self._name(sample)}: {why}", file=sys.stderr)

    @staticmethod
    def _bad_shard(e: Exception) -> bool:
        """webdataset's handler for a shard that cannot be read (truncated tar...): say so, go on to the next."""
        print(f"warning: skipping the rest of an unreadable shard: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        return True

    def _first_readable(self, n: int) -> list[torch.Tensor]:
        """The first ``n`` images that decode, shards in listed order."""
        import webdataset as wds

        found = []
        for sample in wds.tarfile_to_samples(handler=lambda e: True)({"url": u} for u in self.urls):
            try:
                found.append(self._decode(sample))
            except NpyLayoutError:
                raise
            except Exception:  # named later, when training reads it
                continue
            if self.labels:
                self._label(sample)  # shards without labels stop here, before anything is written
            if len(found) == n:
                break
        return found

    def _check_one_readable(self) -> None:
        """Fail before anything is written when no sample decodes (reads until one does: usually one)."""
        if not self._first_readable(1):
            raise ValueError(f"no readable image in data.urls ({len(self.urls)} shard(s) read)")

    def __len__(self) -> int:
        if self.num_images is None:
            raise TypeError("the samples of remote shards read once are not counted")
        return self.num_images  # samples per epoch, all processes together

    def __getitem__(self, i: int):
        """Sample ``i`` of the shards in listed order (reconstruction panels), augmented as ``SeededSamples``
        augments index ``i`` outside an epoch."""
        if self._head is None or len(self._head) <= i:
            self._head = self._first_readable(max(i + 1, 8))
        with seeded_rngs(sample_seed(self.seed, -1, i)):
            return self.transform(self._head[i]), 0
