"""Progress output: a tqdm bar on a terminal, a few plain lines anywhere else."""

import io

from tqdm import tqdm

from st_ar.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar():
    bar = progress_bar(total=3, desc="x", stream=Terminal())
    assert isinstance(bar, tqdm) and not isinstance(bar, LineProgress)
    bar.close()


def test_a_log_file_gets_one_line_per_interval_and_a_final_one():
    log = io.StringIO()
    with progress_bar(total=5000, desc="train", unit="step", initial=1000, interval=3600, stream=log) as bar:
        for _ in range(4000):
            bar.update(1)
            bar.set_postfix({"loss": f"{2.5:.3f}"})
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 1  # the interval never elapsed: only the closing line
    assert lines[0].startswith("train: 5000/5000 step (100%), ") and lines[0].endswith("loss=2.500")
    assert bar.n == 5000 and bar.total == 5000


def test_lines_come_at_the_interval_with_rate_and_eta():
    log = io.StringIO()
    bar = progress_bar(total=10, desc="extract", unit="img", interval=0, stream=log)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["1/10", "2/10", "3/10", "4/10"]  # closing adds no repeat
    assert "img/s" in lines[-1] and "ETA" in lines[-1]


def test_an_iterable_is_wrapped_and_a_disabled_bar_prints_nothing():
    log = io.StringIO()
    assert list(progress_bar(range(7), desc="features", interval=3600, stream=log)) == list(range(7))
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("features: 7/7 it (100%)")
    quiet = io.StringIO()
    with progress_bar(total=3, disable=True, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
