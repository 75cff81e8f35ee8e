"""Fuzzing recipes: valid recipes, mutated, through `deploykit recipe check` and `deploykit build --dry-run`.

Mutations: values of other types and out of range (huge integers, NaN, infinity, negative numbers), unknown,
missing and renamed keys, keys that are not strings, shared sub-structures (YAML anchors and aliases), alias
bombs (nested lists, and lists of one long string aliased many times), deep nesting, duplicate keys, other
encodings, byte-order marks, stray non-UTF-8 bytes. Every input
ends in exit 0 (a mutation that is still a valid recipe) or exit 2 with one message, never a traceback or an
internal error, and nothing is written: the recipe's folder keeps its files and --out stays absent (the
build goes as far as a build goes before it writes: recipe, files, teacher, memory, output folder).

CI runs a small fixed set; a large run is ``DEPLOYKIT_FUZZ_EXAMPLES=5000 pytest tests/test_recipe_fuzz.py -s``
(random seeds; prints how many inputs each command was given).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploykit.cli import main
from deploykit.recipe import load_recipe

EXAMPLES = int(os.environ.get("DEPLOYKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 60, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Valid recipes to start from: the shipped zoo teacher (weights in the package) and a random-weights SD
# pipeline (no files needed), between them every stage a CPU build can check.
BASES = [
    {"name": "fuzz", "teacher": "zoo:digits", "target": "cpu", "seed": 0, "stages": [
        {"stage": "prune", "criterion": "taylor", "macs_target": 0.5, "round_to": 8, "batch_size": 16},
        {"stage": "sparsify", "method": "magnitude", "exclude": ["conv_in", "conv_out"]},
        {"stage": "distill", "steps": 5, "batch_size": 16, "feature_kd_weight": 0.1, "checkpoint_every": 5},
        {"stage": "export", "atol": 1.0e-4, "check_batch": 2},
        {"stage": "quantize", "calibration_samples": 4, "calibration_steps": 2, "max_quality_loss": {"fid": 2.0}},
        {"stage": "bench", "backends": ["torch-cpu", "onnxruntime-cpu"], "batch_size": 8, "warmup": 1, "runs": 5},
        {"stage": "eval", "num_samples": 32, "steps": 4, "batch_size": 16}]},
    {"name": "fuzz-sd", "teacher": "random:tiny-sd", "resolution": 32, "seed": 7, "stages": [
        {"stage": "prune", "round_to": 4},
        {"stage": "distill", "steps": 2, "prompts": "prompts.txt", "teacher_samples": 4, "teacher_sample_steps": 2},
        {"stage": "export", "check_batch": 2},
        {"stage": "bench", "backends": ["torch-cpu"], "batch_size": 2, "end_to_end": {"steps": 2, "runs": 1}},
        {"stage": "eval", "num_samples": 2, "steps": 2, "prompts": ["a bird"]}]},  # not a distill prompt
    {"name": "fuzz-jetson", "teacher": "random:tiny-sd", "resolution": 32, "target": "jetson-orin-nano", "stages": [
        {"stage": "prune", "round_to": 4},
        {"stage": "export"},
        {"stage": "bundle", "batch_size": 2, "batch": [1, 2, 2], "resolution": [32, 32, 64], "runs": 5}]},
]
FIELDS = sorted({"name", "teacher", "topology", "resolution", "target", "seed", "stage", "steps", "batch_size",
                 "prompts", "macs_target", "atol", "rtol", "num_samples", "backends", "batch", "warmup", "runs",
                 "end_to_end", "max_quality_loss", "calibration_samples", "checkpoint_every", "criterion"})

# -- what a careless user or an attacker writes ------------------------------------------------------------------------

hostile_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**32, 2**63, 2**64, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "..", "../../etc/passwd", "/etc/passwd", "/dev/zero", "prompts.txt", "zoo:nope", "hf:a",
                     "random:sd15", "[/x]", "[bold]red", "\x00", "é" * 3, "a" * 20000, "stage", "cpu", "yes", "1e309"]),
    st.booleans(),
    st.none(),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=8)
# numbers at and past the edges of every range: for the numeric settings themselves
edge_numbers = st.sampled_from([0, -1, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, 10**30, float("inf"), float("-inf"),
                                float("nan"), 1e308, 5e-324, 1.5, 4096, 4097, 100_000_000]) | st.floats() | st.integers()
keys = (st.sampled_from(FIELDS) | st.text(max_size=10) | st.sampled_from(["[/x]", "[bold]k", "<<", "\x00"])
        | st.integers(-3, 3) | st.booleans() | st.none())


def _paths(node, prefix=()):
    """Every key path (keys and list indices from the top) of a recipe's structure."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _at(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated_structure(draw):
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(data))
        op = draw(st.sampled_from(["number", "number", "replace", "replace", "delete", "add", "wrap", "share", "swap"]))
        numbers = [p for p in paths if type(_at(data, p)[p[-1]]) in (int, float)]
        path = draw(st.sampled_from(numbers if op == "number" and numbers else paths))
        parent, key = _at(data, path), path[-1]
        if op == "number":
            parent[key] = draw(edge_numbers)
        elif op == "replace":
            parent[key] = draw(hostile_values)
        elif op == "delete":
            del parent[key]
        elif op == "add":
            target = parent if isinstance(parent, dict) else data
            target[draw(keys)] = draw(hostile_values)
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif op == "share":  # the same object twice: yaml.safe_dump writes an anchor and an alias
            other = draw(st.sampled_from(paths))
            if other[:len(path)] != path and path[:len(other)] != other:
                _at(data, other)[other[-1]] = parent[key]
        elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
            i = draw(st.integers(0, len(parent) - 1))
            parent[key], parent[i] = parent[i], parent[key]
    return data


def _dump(data, flow: bool, unicode: bool) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=unicode, sort_keys=False, width=10**6)


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


@st.composite
def recipe_bytes(draw):
    """A mutated recipe as the bytes of a file."""
    data = draw(mutated_structure())
    lists = [p for p in _paths(data) if isinstance(_at(data, p)[p[-1]], list)
             and all(isinstance(v, str) for v in _at(data, p)[p[-1]])]
    edit = draw(st.sampled_from(["none", "none", "duplicate", "drop", "bomb", "strings", "deep", "digits", "insert"]))
    if edit == "strings" and lists:  # a list of strings that are one long string, aliased: small to write, huge to hold
        path = draw(st.sampled_from(lists))
        _at(data, path)[path[-1]] = "__STRINGS__"
    text = _dump(data, draw(st.booleans()), draw(st.booleans()))
    size, count = draw(st.sampled_from([(10, 3), (1000, 5000), (300_000, 100_000)]))
    text = text.replace("__STRINGS__", f"[&s {'x' * size}{', *s' * count}]")
    lines = text.splitlines(keepends=True)
    if edit == "duplicate" and lines:  # a key given twice, where the line is a key
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    elif edit == "drop" and lines:
        del lines[draw(st.integers(0, len(lines) - 1))]
    elif edit == "bomb":
        lines = ["l0: &l0 lol\n", BOMB, *lines]
        lines = [line.replace("round_to: 4", "round_to: *l8") for line in lines]
    elif edit == "deep":
        depth = draw(st.sampled_from([20, 40, 1000, 20000]))
        lines.append(f"extra: {'[' * depth}{']' * depth}\n")
    elif edit == "digits":
        lines = [line.replace("runs: 5", "runs: " + "9" * draw(st.sampled_from([20, 4400, 20000]))) for line in lines]
    elif edit == "insert":
        i = draw(st.integers(0, len(lines)))
        lines.insert(i, draw(st.text(max_size=10)))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    raw = "".join(lines).encode(encoding, errors="replace")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw


# -- the property ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tried():
    counts = {"inputs": 0, "valid": 0, "refused": 0}
    yield counts
    if EXAMPLES:
        print(f"\nrecipe fuzzing: {counts['inputs']} inputs, each through `recipe check` and `build --dry-run`: "
              f"{counts['valid']} still valid, {counts['refused']} refused (exit 2)")


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _check_outcome(rc: int, err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc in (0, 2), err
    if rc == 2:
        assert err.startswith("error: ") and err.count("error: ") == 1, err  # one message (it may span lines)


def _check_valid(recipe) -> None:
    """What a recipe that loads can be trusted with: the manifest stores it as JSON, the stages seed generators."""
    json.dumps(load_recipe(recipe).model_dump(), allow_nan=False)
    torch.Generator().manual_seed(load_recipe(recipe).seed * 1_000_003 + 10_000_000)


@FUZZ
@given(raw=recipe_bytes())
def test_a_mutated_recipe_is_valid_or_one_clear_error_and_nothing_is_written(tmp_path, capsys, tried, raw):
    case = tmp_path / f"case{tried['inputs']}"
    case.mkdir()
    (case / "prompts.txt").write_text("a cat\na dog\n")
    recipe = case / "recipe.yaml"
    recipe.write_bytes(raw)
    out = case / "out"
    tried["inputs"] += 1

    rc, err = _run(capsys, "recipe", "check", str(recipe))
    _check_outcome(rc, err)
    if rc == 0:
        _check_valid(recipe)
    build_rc, build_err = _run(capsys, "build", str(recipe), "--out", str(out), "--dry-run")
    _check_outcome(build_rc, build_err)
    # the build refuses whatever the check refuses, and checks more (the teacher, the memory)
    assert rc == 0 or build_rc == 2, (err, build_err)
    tried["valid" if build_rc == 0 else "refused"] += 1
    assert sorted(p.name for p in case.iterdir()) == ["prompts.txt", "recipe.yaml"]


def test_the_fuzzer_starts_from_valid_recipes(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    for i, base in enumerate(BASES):
        recipe = tmp_path / f"base{i}.yaml"
        recipe.write_text(_dump(base, flow=False, unicode=True))
        rc, err = _run(capsys, "build", str(recipe), "--out", str(tmp_path / "out"), "--dry-run")
        assert rc == 0, err
        assert not (tmp_path / "out").exists()
