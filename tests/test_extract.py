"""Code extraction: codes match the tokenizer on the same crops, one process == two, kills resume."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from st_ar.cli import main as cli_main
from st_ar.data import CodesDataset, crops_for_extraction, extract_codes, image_to_tensor, open_dataset
from st_ar.data.codes import ExtractionStopped, codes_dtype, file_sha256, read_codes_meta
from st_ar.models.vq import VQConfig, VQModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # crop side; VQ-debug downsamples by 2 -> 8x8 grid, T = 64
RANGES = (1.25, 1.1)  # ADM crops of 20 and 17 pixels: corners differ from the centre


def _make_folder(root, n_per_class=4, classes=("cat", "dog", "emu")):
    """Small RGB and grayscale images of assorted sizes (some smaller than the crop, so upscaled)."""
    rng = np.random.default_rng(0)
    sizes = [(24, 20), (33, 17), (12, 15), (40, 52)]
    for c, name in enumerate(classes):
        os.makedirs(root / name)
        for k in range(n_per_class):
            w, h = sizes[k % len(sizes)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = (xx * (7 + c) + yy * (3 + k)) % 256
            arr = np.clip(base[..., None] + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr) if k % 2 == 0 else Image.fromarray(arr[..., 0]).convert("L")
            img.save(root / name / f"{k:02d}.{'png' if k % 3 else 'JPG'}")
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tiny tokenizer runs faster on one thread, and far faster when other jobs share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    folder = _make_folder(base / "images")
    torch.manual_seed(0)
    vq = VQModel(VQConfig.from_name("VQ-debug")).eval()
    vq_path = str(base / "vq.pt")
    vq.save(vq_path)
    ref = str(base / "reference")
    extract_codes(
        open_dataset(str(folder)), vq_path, ref, image_size=SIZE, crop_ranges=RANGES, batch_size=1, progress=False
    )
    return {"base": base, "folder": str(folder), "vq": vq, "vq_path": vq_path, "ref": ref}


def _same_files(a, b, names=("codes.npy", "labels.npy", "meta.json")):
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), f"{name} differs between {a} and {b}"


def test_codes_are_the_tokenizer_codes_of_each_crop(setup):
    vq, ds = setup["vq"], open_dataset(setup["folder"])
    codes = np.load(os.path.join(setup["ref"], "codes.npy"), mmap_mode="r")
    meta = read_codes_meta(setup["ref"])
    assert codes.shape == (len(ds), 20, 64) and codes.dtype == np.uint16
    assert meta["grid"] == [8, 8] and meta["seq_len"] == 64 and meta["vocab_size"] == 64 and meta["count"] == 12
    assert meta["tokenizer_sha256"] == file_sha256(setup["vq_path"])
    assert meta["crop_ranges"] == list(RANGES) and meta["num_crops"] == 20 and meta["complete"] is True
    assert not os.path.exists(os.path.join(setup["ref"], "done"))
    np.testing.assert_array_equal(np.load(os.path.join(setup["ref"], "labels.npy")), ds.labels())
    for i in (0, 5, 11):
        img, _ = ds[i]
        crops = [c for r in RANGES for c in crops_for_extraction(img, SIZE, r, "ten")]  # range-major, as documented
        x = torch.stack([image_to_tensor(c) for c in crops])  # (20, 3, 16, 16): the batch extraction encoded
        expected = vq.encode(x).reshape(20, -1)
        np.testing.assert_array_equal(codes[i], expected.numpy())
        with torch.no_grad():
            k = 3  # decoding stored codes == the tokenizer's own reconstruction of that crop
            stored = torch.from_numpy(codes[i, k].astype(np.int64))[None]
            torch.testing.assert_close(vq.decode(stored), vq(x[k : k + 1]).reconstruction)


def test_batching_and_workers_do_not_change_codes(setup, tmp_path):
    # batches of 3 images through 2 workers; chunk boundaries cut batches short
    extract_codes(
        open_dataset(setup["folder"]),
        setup["vq_path"],
        tmp_path,
        image_size=SIZE,
        crop_ranges=RANGES,
        batch_size=3,
        chunk_size=5,
        num_workers=2,
        progress=False,
    )
    a = np.load(os.path.join(setup["ref"], "codes.npy"))
    b = np.load(tmp_path / "codes.npy")
    # different batch compositions may move float results by an ulp; codes must still agree almost everywhere
    assert (a == b).mean() > 0.999


def test_interrupted_extraction_resumes_without_redoing_chunks(setup, tmp_path):
    out = tmp_path / "out"
    kw = dict(image_size=SIZE, crop_ranges=RANGES, batch_size=1, chunk_size=3, progress=False)
    ds = open_dataset(setup["folder"])
    with pytest.raises(ExtractionStopped):
        extract_codes(ds, setup["vq_path"], out, stop_after_chunks=2, **kw)
    assert sorted(os.listdir(out / "done")) == ["chunk-0000000.json", "chunk-0000001.json"]
    assert read_codes_meta(out, require_complete=False)["complete"] is False
    with pytest.raises(ValueError, match="unfinished"):
        CodesDataset(out)
    # a kill mid-chunk leaves partial rows behind: scribble over everything after the finished chunks
    codes = np.load(out / "codes.npy", mmap_mode="r+")
    codes[6:] = 7
    codes.flush()
    del codes
    report = extract_codes(ds, setup["vq_path"], out, **kw)
    assert (report.num_chunks, report.already_done, report.encoded_chunks, report.encoded_images) == (4, 2, 2, 6)
    _same_files(setup["ref"], out, names=("codes.npy", "labels.npy"))
    # a finished folder with the same settings: nothing to do
    again = extract_codes(ds, setup["vq_path"], out, **kw)
    assert again.encoded_chunks == 0 and again.already_done == 4


def test_refuses_to_resume_with_other_settings(setup, tmp_path):
    ds = open_dataset(setup["folder"])
    kw = dict(crop_ranges=RANGES, batch_size=1, chunk_size=3, progress=False)
    with pytest.raises(ExtractionStopped):
        extract_codes(ds, setup["vq_path"], tmp_path, image_size=SIZE, stop_after_chunks=1, **kw)
    torch.manual_seed(1)
    other = str(tmp_path.parent / "other_vq.pt")
    VQModel(VQConfig.from_name("VQ-debug")).save(other)
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        extract_codes(ds, other, tmp_path, image_size=SIZE, **kw)
    with pytest.raises(ValueError, match="image_size: 16 in the folder, 32 now"):
        extract_codes(ds, setup["vq_path"], tmp_path, image_size=32, **kw)
    assert len(os.listdir(tmp_path / "done")) == 1  # untouched


def test_corrupt_images_fail_or_are_skipped(setup, tmp_path):
    folder = _make_folder(tmp_path / "images", n_per_class=2, classes=("a", "b"))
    bad = folder / "a" / "01.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    kw = dict(image_size=SIZE, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=str(bad)):
        extract_codes(open_dataset(str(folder)), setup["vq_path"], tmp_path / "fail", **kw)
    extract_codes(open_dataset(str(folder)), setup["vq_path"], tmp_path / "skip", on_corrupt="skip", **kw)
    meta = read_codes_meta(tmp_path / "skip")
    assert meta["skipped"] == [str(bad)] and meta["skipped_count"] == 1
    labels = np.load(tmp_path / "skip" / "labels.npy")
    np.testing.assert_array_equal(labels, [0, -1, 1, 1])
    ds = CodesDataset(tmp_path / "skip")
    assert len(ds) == 3 and list(ds.labels()) == [0, 1, 1]


def test_cli_extract_and_errors(setup, tmp_path, capsys):
    args = ["extract", "--dataset", f"folder:{setup['folder']}", "--vq-ckpt", setup["vq_path"], "--no-progress"]
    args += ["--num-workers", "0", "--crops", "center", "--limit", "5", "--out", str(tmp_path / "c")]
    assert cli_main([*args, "--image-size", "16"]) == 0
    assert np.load(tmp_path / "c" / "codes.npy").shape == (5, 1, 64)
    assert "encoded 1 chunk(s), 5 images" in capsys.readouterr().out
    assert cli_main([*args[:-1], str(tmp_path / "d"), "--image-size", "15"]) == 2
    assert "not a multiple of the tokenizer's downsample factor 2" in capsys.readouterr().err


def test_codes_dtype():
    assert codes_dtype(16384) == np.uint16 and codes_dtype(65536) == np.uint16 and codes_dtype(65537) == np.int32


@pytest.mark.dist
def test_two_processes_write_the_same_bytes_as_one(setup, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "st_ar.cli", "extract", "--dataset", setup["folder"], "--vq-ckpt", setup["vq_path"]]
    cmd += ["--image-size", str(SIZE), "--batch-size", "1", "--chunk-size", "2", "--num-workers", "0"]
    for r in RANGES:
        cmd += ["--crop-range", str(r)]
    cmd += ["--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO}
    # first a run that dies after one chunk per rank, then the resumed run
    stopped = subprocess.run(
        cmd, env={**env, "ST_AR_EXTRACT_STOP_AFTER": "1"}, capture_output=True, text=True, timeout=120
    )
    assert stopped.returncode != 0, stopped.stdout + stopped.stderr
    # usually one marker per rank; torchrun may kill the slower rank before it writes its own
    already = len(os.listdir(out / "done"))
    assert already in (1, 2)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{already} of 6 chunks were already done" in done.stdout
    # the ranks' lines may interleave in torchrun's output: search the whole text
    encoded = [int(n) for n in re.findall(r"rank \d: encoded (\d+) chunk", done.stdout)]
    assert len(encoded) == 2 and sum(encoded) == 6 - already, done.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"]
    _same_files(setup["ref"], out, names=("codes.npy", "labels.npy"))


def _extract_cmd(setup, out):
    cmd = [sys.executable, "-m", "st_ar.cli", "extract", "--dataset", setup["folder"], "--vq-ckpt", setup["vq_path"]]
    cmd += ["--image-size", str(SIZE), "--batch-size", "1", "--chunk-size", "4", "--num-workers", "0"]
    for r in RANGES:
        cmd += ["--crop-range", str(r)]
    return [*cmd, "--no-progress", "--out", str(out)]


def _run_apart(cmd):
    # a separate process: a SIGBUS from writing into a memory-mapped file on a full disk shows up as its
    # return code (-7) instead of killing pytest
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _make_sparse(path):
    """Rewrite ``path`` with holes where its 4 KiB blocks are zero, as codes.npy was before its blocks were
    reserved at creation."""
    data = path.read_bytes()
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(len(data))
        for at in range(0, len(data), 4096):
            if data[at : at + 4096].strip(b"\0"):
                f.seek(at)
                f.write(data[at : at + 4096])
    assert path.read_bytes() == data and os.stat(path).st_blocks * 512 < len(data)


def test_a_full_disk_fails_at_the_start_with_the_space_needed(setup, small_disk, capsys):
    disk = small_disk.mount("1m")
    small_disk.leave(disk, 16384)  # codes.npy needs 12 images x 20 crops x 64 codes x 2 bytes = 30 kB
    out = disk / "codes"
    done = _run_apart(_extract_cmd(setup, out))
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    err = done.stderr.strip()
    assert err.startswith(f"st-ar extract: error: no space left on {out}: codes.npy needs 0.031 MB"), err
    assert err.endswith("free; free space or use another --out") and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(out)) == [".lock"]  # the files it could not fill are gone, and their space with them
    # with room again the same command extracts everything, the same codes as elsewhere
    for filler in disk.glob("filler-*"):
        filler.unlink()
    assert cli_main(_extract_cmd(setup, out)[3:]) == 0
    _same_files(setup["ref"], out, names=("codes.npy", "labels.npy"))


def test_resuming_a_sparse_codes_file_on_a_full_disk_fails_before_writing(setup, small_disk):
    disk = small_disk.mount("1m")
    out = disk / "codes"
    with pytest.raises(ExtractionStopped):
        extract_codes(
            open_dataset(setup["folder"]), setup["vq_path"], out, image_size=SIZE, crop_ranges=RANGES,
            batch_size=1, chunk_size=4, progress=False, stop_after_chunks=1,
        )  # fmt: skip
    _make_sparse(out / "codes.npy")  # as a run from before blocks were reserved left it
    before = (out / "codes.npy").read_bytes()
    small_disk.leave(disk, 4096)  # less than the holes still to fill
    done = _run_apart(_extract_cmd(setup, out))
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert f"st-ar extract: error: no space left on {out}: codes.npy needs 0.0" in done.stderr, done.stderr
    assert (out / "codes.npy").read_bytes() == before and os.listdir(out / "done") == ["chunk-0000000.json"]
    for filler in disk.glob("filler-*"):
        filler.unlink()
    report = extract_codes(
        open_dataset(setup["folder"]), setup["vq_path"], out, image_size=SIZE, crop_ranges=RANGES,
        batch_size=1, chunk_size=4, progress=False,
    )  # fmt: skip
    assert report.already_done == 1 and report.encoded_chunks == 2
    assert os.stat(out / "codes.npy").st_blocks * 512 >= os.path.getsize(out / "codes.npy")
    _same_files(setup["ref"], out, names=("codes.npy", "labels.npy"))
