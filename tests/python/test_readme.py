"""The README's Python blocks, run exactly as pasted.

Each block after a "<!-- python: NAME -->" marker runs in a fresh interpreter;
what it prints must match the block after "<!-- python-output: NAME -->", and
MindSpore's example must print MindSpore's documented values. Printed floats
are compared to within two float32 ulps, where another x86 variant of the
kernels may round differently.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
NUMBER = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")
# mindspore.ops.batch_norm's documented output for the same example.
MINDSPORE_OUTPUT = [2.1621194, 1.2360122, 14.810596, 10.180061]


def readme_blocks(kind):
    """{NAME: body} of the fenced blocks after "<!-- KIND: NAME -->" markers."""
    pattern = re.compile(r"<!-- " + kind + r": (\S+) -->\n```[a-z]*\n(.*?)```", re.DOTALL)
    return dict(pattern.findall(README.read_text()))


def within_two_ulps(actual, expected):
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    return actual.shape == expected.shape and bool(
        np.all(np.abs(actual - expected) <= 2 * np.spacing(np.abs(expected))))


def assert_prints_like(printed, shown):
    """The same text, except that floats may differ by two float32 ulps."""
    assert NUMBER.split(printed) == NUMBER.split(shown), printed
    assert within_two_ulps([float(v) for v in NUMBER.findall(printed)],
                           [float(v) for v in NUMBER.findall(shown)]), printed


PROGRAMS = readme_blocks("python")
OUTPUTS = readme_blocks("python-output")


def run_block(name):
    result = subprocess.run([sys.executable, "-c", PROGRAMS[name]], capture_output=True,
                            text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_has_the_mindspore_example_and_an_output_for_each_block():
    assert "mindspore_example.py" in PROGRAMS
    assert set(PROGRAMS) == set(OUTPUTS)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_block_prints_what_the_readme_shows(name):
    assert_prints_like(run_block(name), OUTPUTS[name])


def test_mindspore_example_prints_mindspore_documented_output():
    printed = run_block("mindspore_example.py")
    assert within_two_ulps([float(v) for v in NUMBER.findall(printed)], MINDSPORE_OUTPUT), printed
