"""Training views over pre-extracted codes: distinct, deterministic, epoch-dependent, worker-independent."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from st_ar.data import CodesDataset, check_codes_match, choose_views
from st_ar.data.codes import CODES_FORMAT, CODES_VERSION
from st_ar.data.transforms import CROP_SETS

N, RANGES, CROPS, T = 40, 2, 10, 16


def _fake_extraction(folder, labels=None, crops_per_range=CROPS, complete=True):
    """An extraction folder written by hand: codes[i, k, t] = 100 * i + k, so a sequence says where it came from."""
    os.makedirs(folder, exist_ok=True)
    k = RANGES * crops_per_range
    codes = (100 * np.arange(N)[:, None, None] + np.arange(k)[None, :, None]) * np.ones((1, 1, T), np.int64)
    np.save(os.path.join(folder, "codes.npy"), codes.astype(np.uint16))
    labels = np.arange(N) % 10 if labels is None else np.asarray(labels)
    np.save(os.path.join(folder, "labels.npy"), labels.astype(np.int64))
    meta = {
        "format": CODES_FORMAT,
        "version": CODES_VERSION,
        "count": N,
        "num_classes": 10,
        "crop_ranges": [1.1, 1.05][:RANGES],
        "crops": "ten" if crops_per_range == 10 else "center",
        "crop_names": list(CROP_SETS["ten" if crops_per_range == 10 else "center"]),
        "crops_per_range": crops_per_range,
        "num_crops": k,
        "grid": [4, 4],
        "seq_len": T,
        "vocab_size": 4096,
        "image_size": 64,
        "complete": complete,
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return folder


@pytest.fixture
def folder(tmp_path):
    return _fake_extraction(tmp_path / "codes")


def _crops(seqs, i):
    """Crop-axis indices of a (M, T) sample of image i (every code of a sequence is the same)."""
    assert (seqs == seqs[:, :1]).all()
    return [int(s) - 100 * i for s in seqs[:, 0]]


def test_views_are_distinct_crops_of_one_range_and_match_the_codes(folder):
    ds = CodesDataset(folder, num_views=2)
    ranges_seen = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        for i in range(N):
            seqs, label = ds[i]
            assert seqs.shape == (2, T) and seqs.dtype == torch.int64 and label == i % 10
            a, b = _crops(seqs, i)
            assert a != b and a // CROPS == b // CROPS  # two different crops of the same crop range
            assert [a, b] == ds.views(i)
            ranges_seen.add(a // CROPS)
    assert ranges_seen == {0, 1}


def test_choose_views_never_repeats_and_covers_all_crops():
    counts = np.zeros(RANGES * CROPS, int)
    for index in range(500):
        for epoch in range(4):
            views = choose_views(7, epoch, index, RANGES, CROPS, 10)
            assert len(set(views)) == 10 and len({v // CROPS for v in views}) == 1
            counts[choose_views(7, epoch, index, RANGES, CROPS, 2)] += 1
    # 2000 draws of 2 views over 20 crops: 200 each on average (sd ~14); all crops used, none favoured
    assert counts.min() > 150 and counts.max() < 250


def test_views_are_deterministic_and_change_with_epoch_and_seed(folder):
    a, b = CodesDataset(folder, num_views=2, seed=3), CodesDataset(folder, num_views=2, seed=3)
    first = [a.views(i) for i in range(N)]
    assert first == [b.views(i) for i in range(N)]
    a.set_epoch(1)
    assert sum(a.views(i) != first[i] for i in range(N)) > N // 2
    c = CodesDataset(folder, num_views=2, seed=4)
    assert sum(c.views(i) != first[i] for i in range(N)) > N // 2


def _epoch_batches(loader, ds, epoch):
    ds.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_same_views_whatever_the_number_of_workers(folder):
    ds = CodesDataset(folder, num_views=2, seed=1)
    plain = DataLoader(ds, batch_size=8)
    pooled = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):  # persistent workers must see set_epoch too
        for (x0, y0), (x1, y1) in zip(_epoch_batches(plain, ds, epoch), _epoch_batches(pooled, ds, epoch), strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(_epoch_batches(plain, ds, 0)[0][0], _epoch_batches(plain, ds, 1)[0][0])


def test_works_with_distributed_sampler(folder):
    ds = CodesDataset(folder, num_views=2)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        for x, _ in DataLoader(ds, batch_size=4, sampler=sampler):
            seen += [int(s[0, 0]) // 100 for s in x]
            assert x.shape[1:] == (2, T)
    assert sorted(seen) == list(range(N))


def test_memmap_is_opened_lazily_and_never_pickled(folder):
    ds = CodesDataset(folder)
    assert ds._codes is None
    ds[0]
    assert ds._codes is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._codes is None and torch.equal(clone[5][0], ds[5][0])


def test_too_many_views_or_mismatched_model_is_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="num_views=11 but .* 10 crop"):
        CodesDataset(folder, num_views=11)
    single = _fake_extraction(tmp_path / "center", crops_per_range=1)
    assert CodesDataset(single)[0][0].shape == (1, T)
    with pytest.raises(ValueError, match="num_views=2 but .* 1 crop"):
        CodesDataset(single, num_views=2)
    with pytest.raises(ValueError, match="codes use vocabulary 4096, model 16384"):
        CodesDataset(folder, vocab_size=16384, seq_len=T)
    with pytest.raises(ValueError, match="sequence length 16 .* vs model block_size 256"):
        CodesDataset(folder, vocab_size=4096, seq_len=256)
    meta = CodesDataset(folder).meta
    check_codes_match(meta, 4096, 16)  # fits: no error
    with pytest.raises(ValueError, match="sequence length 16"):
        check_codes_match(meta, 4096, 64)


def test_skipped_images_are_left_out(tmp_path):
    labels = np.arange(N) % 10
    labels[[3, 17]] = -1
    ds = CodesDataset(_fake_extraction(tmp_path / "c", labels=labels))
    assert len(ds) == N - 2
    rows = [int(ds[i][0][0, 0]) // 100 for i in range(len(ds))]
    assert 3 not in rows and 17 not in rows and rows[3] == 4


def test_unfinished_or_missing_extraction_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unfinished"):
        CodesDataset(_fake_extraction(tmp_path / "c", complete=False))
    with pytest.raises(FileNotFoundError, match="st-ar extract"):
        CodesDataset(tmp_path / "nothing")


def test_same_orientation_views_are_both_mirrored_or_both_not(folder):
    mirrored = lambda crop: (crop % CROPS) >= 5  # noqa: E731  ten crops: 5-9 are the flips of 0-4
    ds = CodesDataset(folder, num_views=2, seed=3, same_orientation=True)
    plain = CodesDataset(folder, num_views=2, seed=3)
    kinds, mixed = set(), 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(N):
            a, b = _crops(ds[i][0], i)
            assert a != b and a // CROPS == b // CROPS and mirrored(a) == mirrored(b)
            kinds.add(mirrored(a))
            mixed += mirrored(plain.views(i)[0]) != mirrored(plain.views(i)[1])
    assert kinds == {False, True}
    assert mixed > 0.4 * 3 * N  # today's draw: 5/9 of the pairs hold exactly one mirrored crop
    # deterministic per (seed, epoch, index), and another seed draws others
    again = CodesDataset(folder, num_views=2, seed=3, same_orientation=True)
    again.set_epoch(2)
    assert [again.views(i) for i in range(N)] == [ds.views(i) for i in range(N)]
    other = CodesDataset(folder, num_views=2, seed=4, same_orientation=True)
    other.set_epoch(2)
    assert sum(other.views(i) != ds.views(i) for i in range(N)) > N // 2
    # off, the draw is the one it always was
    assert choose_views(3, 2, 7, RANGES, CROPS, 2) == plain.views(7)
    # within an orientation every pair is drawn
    pairs = {tuple(sorted(choose_views(0, 0, i, 1, CROPS, 2, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]))) for i in range(2000)}
    assert len(pairs) == 2 * 10


def test_same_orientation_views_need_mirrored_crops(tmp_path):
    single = _fake_extraction(tmp_path / "center", crops_per_range=1)
    with pytest.raises(ValueError, match="same_orientation_views needs 1 crop\\(s\\) of each orientation"):
        CodesDataset(single, same_orientation=True)
    with pytest.raises(ValueError, match="same_orientation_views needs 6 crop"):
        CodesDataset(_fake_extraction(tmp_path / "ten"), num_views=6, same_orientation=True)
