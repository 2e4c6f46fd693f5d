"""Every reader of outside input, fuzzed (issue 24): Hypothesis mutates real files the project's own
writers made (and pure random bytes); each input must parse or be refused with an AmygdalaError,
within 2 s and a 512 MiB traced peak (tests/helpers/fuzz.py). A short run here; `./dev bench fuzz`
runs the long one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from helpers import fuzz

EXAMPLES = int(os.environ.get("AMYGDALA_FUZZ_EXAMPLES", "250"))
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, fuzz.make_seeds(folder)


@pytest.mark.parametrize("reader", sorted(fuzz.READERS))
def test_a_reader_parses_or_refuses_every_input(corpus, reader):
    folder, seeds = corpus
    read = fuzz.READERS[reader]
    for seed in seeds[reader]:  # the seeds themselves parse
        assert fuzz.bounded(read, seed, folder) == "ok", f"{reader}: a seed file was refused"

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz.mutated(seeds[reader]))
    def run(data):
        fuzz.bounded(read, data, folder)  # raises on anything but a value or an AmygdalaError

    run()


REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.bin")), ids=lambda p: p.name)
def test_inputs_the_long_run_found_stay_refused(corpus, path):
    """Inputs ./dev bench fuzz once failed on (named READER-what.bin): a BadZipFile escaping
    is_zipfile, a 1.4 KB zip that took torch's zip reader to a 1.5 GB traced peak."""
    folder, _ = corpus
    assert fuzz.bounded(fuzz.READERS[path.name.split("-")[0]], path.read_bytes(), folder) == "refused"
