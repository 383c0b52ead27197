"""Our Horovod build's patches (scripts/horovod-patches/, docs/horovod.md), each checked
against the behaviour it fixes:
- 0002: a Horovod re-initialised in the same process (hvd.shutdown + hvd.init, as every
  elastic reset does) keeps a cycle time and fusion threshold fixed by the environment."""
import json
import re

import pytest

from tests.conftest import python_cmd, run_cmd
from tests.workers import hvd_params

MIB = 1024 * 1024
DEFAULT_THRESHOLD = 128 * MIB  # Horovod's default HOROVOD_FUSION_THRESHOLD
CYCLE_MS = 50  # far above the default 1 ms, so a lost setting shows in the timing


def _fused_responses(threshold):
    """Byte sizes of the fused responses for hvd_params' group, by Horovod's documented rule:
    consecutive tensors are fused while their total stays at most the threshold."""
    sizes, current = [], 0
    for _ in range(hvd_params.TENSORS):
        if current and current + hvd_params.TENSOR_BYTES > threshold:
            sizes.append(current)
            current = 0
        current += hvd_params.TENSOR_BYTES
    return sizes + [current]


def _per_init(stdout):
    """[(cycle_ms, [fused response sizes])] per init, from hvd_params' output and Horovod's
    trace log (the tiny allreduces' 4-byte responses left out)."""
    inits = []
    for line in stdout.splitlines():
        if line.startswith("INIT "):
            inits.append([None, []])
        elif line.startswith("PARAMS "):
            inits[-1][0] = json.loads(line[len("PARAMS "):])["cycle_ms"]
        elif m := re.search(r"Created response of size (\d+)", line):
            if int(m.group(1)) >= hvd_params.TENSOR_BYTES:
                inits[-1][1].append(int(m.group(1)))
    return [tuple(i) for i in inits]


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [
    {"HOROVOD_CYCLE_TIME": str(CYCLE_MS)},  # unpatched: the threshold became 1 MB
    {"HOROVOD_CYCLE_TIME": str(CYCLE_MS), "HOROVOD_FUSION_THRESHOLD": str(4 * MIB)},  # crashed
    {"HOROVOD_FUSION_THRESHOLD": str(4 * MIB)},
], ids=["cycle", "cycle+fusion", "fusion"])
def test_reinitialised_horovod_keeps_fixed_cycle_time_and_fusion_threshold(fixed):
    inits = 3
    proc = run_cmd(python_cmd("-m", "tests.workers.hvd_params", str(inits)),
                   HOROVOD_LOG_LEVEL="trace", **fixed)
    results = _per_init(proc.stdout)
    print(f"\n{fixed}: (median ms per tiny allreduce, fused responses) per init: {results}")
    assert len(results) == inits
    expected = _fused_responses(int(fixed.get("HOROVOD_FUSION_THRESHOLD", DEFAULT_THRESHOLD)))
    assert expected != _fused_responses(1 * MIB)  # the test tells the unpatched value apart
    for cycle_ms, fused in results:
        assert fused == expected, results
        # An op waits for the next cycle: about CYCLE_MS when it is fixed, about 1 ms (the
        # default) plus the op's own cost otherwise.
        if "HOROVOD_CYCLE_TIME" in fixed:
            assert cycle_ms >= 0.8 * CYCLE_MS, results
        else:
            assert cycle_ms < 0.8 * CYCLE_MS, results

