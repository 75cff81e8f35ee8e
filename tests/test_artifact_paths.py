"""Paths an artifact gives (manifest.json, files.json, architecture.json, symlinks) never lead a reader out of it.

Each tampered artifact is refused with exit 2 by `deploykit inspect` and with InputError by
`Pipeline.from_artifact`, with a message naming the file and the entry, and no file outside the
artifact is opened or listed on the way (watched with a Python audit hook: every open, listdir and
scandir the process makes).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from deploykit.artifact import Artifact
from deploykit.cli import main
from deploykit.errors import InputError
from deploykit.io import atomic_write_json, sha256_file
from deploykit.paths import OutsideFolder, inside, links_leaving
from deploykit.runtime import Pipeline

_watched: list[tuple[str, list[str]]] = []


def _audit(event: str, args: tuple) -> None:
    if _watched and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, Path)):
        path = os.path.realpath(os.fsdecode(args[0]))
        for root, hits in _watched:
            if path == root or path.startswith(root + os.sep):
                hits.append(path)


sys.addaudithook(_audit)


@contextmanager
def nothing_read_under(folder: Path):
    hits: list[str] = []
    _watched.append((os.path.realpath(folder), hits))
    try:
        yield
    finally:
        _watched.pop()
    assert hits == [], f"read outside the artifact: {sorted(set(hits))[:5]}"


def inspect_refuses(artifact: Path, outside: Path, capsys, *expected: str) -> None:
    with nothing_read_under(outside):
        assert main(["inspect", str(artifact)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(e in " ".join(err.split()) for e in expected), err


def loading_refuses(artifact: Path, outside: Path, *expected: str, backend: str | None = None) -> None:
    for verify in (True, False):
        with nothing_read_under(outside), pytest.raises(InputError) as e:
            Pipeline.from_artifact(artifact, backend=backend, verify=verify)
        assert all(x in str(e.value) for x in expected), str(e.value)


def copy_of(artifact: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``artifact`` and, beside it, a folder holding another copy of it: what a path that
    escaped would find, with hashes that match, so that only containment can refuse it."""
    copy, outside = tmp_path / "artifact", tmp_path / "outside"
    shutil.copytree(artifact, copy)
    shutil.copytree(artifact, outside)
    return copy, outside


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    atomic_write_json(path, data)


def rehash(artifact: Path, rel: str) -> None:
    """What an attacker does after editing a file: record its new sha256 in the manifest."""
    edit_json(artifact / "manifest.json", lambda m: m["files"].__setitem__(rel, sha256_file(artifact / rel)))


def test_inside_refuses_every_way_out(tmp_path):
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", tmp_path / "root" / "link")
    os.symlink("sub", tmp_path / "root" / "inner")
    assert inside(tmp_path / "root", "sub/a.json") == tmp_path / "root" / "sub" / "a.json"
    assert inside(tmp_path / "root", "inner/x") == tmp_path / "root" / "inner" / "x"  # a link that stays inside
    for rel, why in [("../secret", "'..'"), ("sub/../../secret", "'..'"), ("/etc/passwd", "absolute"),
                     ("..\\secret", "'..'"), ("link", "symlink"), ("", "not a relative path"), (None, "not a relative"),
                     (3, "not a relative path"), ("a\x00b", "not a relative path")]:
        with pytest.raises(OutsideFolder, match=why):
            inside(tmp_path / "root", rel)
    assert links_leaving(tmp_path / "root", tmp_path / "root") == {"link": str(tmp_path / "secret")}


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_a_stage_dir_outside_the_artifact_is_refused(sd_serve_artifact, tmp_path, capsys, where):
    copy, outside = copy_of(sd_serve_artifact, tmp_path)
    teacher = next((copy / "stages").glob("00-teacher-*")).name
    target = outside / "stages" / teacher
    if where == "symlink":
        shutil.rmtree(copy / "stages" / teacher)
        os.symlink(target, copy / "stages" / teacher)
        expected = ["manifest.json: stages[0].dir:", repr(teacher), f"leads out of the folder through a symlink (to {target})"]
    else:
        escape = os.path.relpath(target, copy / "stages") if where == "relative" else str(target)
        edit_json(copy / "manifest.json", lambda m: m["stages"][0].__setitem__("dir", escape))
        expected = ["manifest.json: stages[0].dir:", repr(escape)]
    inspect_refuses(copy, outside, capsys, *expected)
    loading_refuses(copy, outside, *expected, backend="torch-cpu")  # torch reads the teacher's stage folder


@pytest.mark.parametrize("entry", ["../outside/report.json", "/etc/passwd"])
def test_a_manifest_or_files_json_entry_outside_is_refused(sd_serve_artifact, tmp_path, capsys, entry):
    copy, outside = copy_of(sd_serve_artifact, tmp_path)
    edit_json(copy / "manifest.json", lambda m: m["files"].__setitem__(entry, "0" * 64))
    inspect_refuses(copy, outside, capsys, "manifest.json: files: entry", repr(entry))
    loading_refuses(copy, outside, "manifest.json: files: entry", repr(entry))

    copy, outside = copy_of(sd_serve_artifact, tmp_path / "again")
    teacher = next((copy / "stages").glob("00-teacher-*"))
    edit_json(teacher / "files.json", lambda files: files.__setitem__(entry.replace("..", "../../.."), "0" * 64))
    expected = [f"stages/{teacher.name}/files.json: entry", repr(entry.replace("..", "../../.."))]
    inspect_refuses(copy, outside, capsys, *expected)
    with nothing_read_under(outside), pytest.raises(InputError) as e:
        Pipeline.from_artifact(copy, backend="torch-cpu")
    assert all(x in str(e.value) for x in expected), str(e.value)


@pytest.mark.parametrize("rel", ["model/model.safetensors", "model/architecture.json", "onnx/unet/model.onnx"])
def test_a_file_that_is_a_symlink_out_of_the_artifact_is_refused(zoo_serve_artifact, tmp_path, capsys, rel):
    copy, outside = copy_of(zoo_serve_artifact, tmp_path)
    (copy / rel).unlink()
    os.symlink(outside / rel, copy / rel)  # the same bytes: the hashes match, only the link gives it away
    expected = ["manifest.json: files: entry", repr(rel), f"leads out of the folder through a symlink (to {outside / rel})"]
    inspect_refuses(copy, outside, capsys, *expected)
    loading_refuses(copy, outside, *expected, backend="torch-cpu" if rel.startswith("model/") else None)


def test_a_symlink_no_file_names_is_refused_before_hashing(sd_serve_artifact, tmp_path, capsys):
    copy, outside = copy_of(sd_serve_artifact, tmp_path)
    teacher = next((copy / "stages").glob("00-teacher-*"))
    os.symlink(outside / "report.json", copy / "model" / "extra.json")
    inspect_refuses(copy, outside, capsys, f"model/extra.json: a symlink leading outside the artifact (to {outside / 'report.json'})")
    loading_refuses(copy, outside, "model/extra.json: a symlink leading outside", backend="torch-cpu")
    (copy / "model" / "extra.json").unlink()
    os.symlink(outside / "stages", teacher / "pipeline" / "more")
    expected = f"stages/{teacher.name}/pipeline/more: a symlink leading outside the artifact (to {outside / 'stages'})"
    inspect_refuses(copy, outside, capsys, expected)
    loading_refuses(copy, outside, expected, backend="torch-cpu")


@pytest.mark.parametrize("config", ["../outside/model", "/etc"])
def test_an_architecture_json_that_names_a_path_is_refused(zoo_serve_artifact, tmp_path, capsys, config):
    # diffusers' from_config reads a string config as a folder to load another config from
    copy, outside = copy_of(zoo_serve_artifact, tmp_path)
    edit_json(copy / "model" / "architecture.json", lambda arch: arch.__setitem__("config", config))
    rehash(copy, "model/architecture.json")
    expected = ["model/architecture.json: config: must be a JSON object", repr(config)]
    inspect_refuses(copy, outside, capsys, *expected)
    for backend in ("torch-cpu", "onnxruntime-cpu"):
        loading_refuses(copy, outside, *expected, backend=backend)


def test_a_sound_artifact_still_verifies_and_loads(zoo_serve_artifact, capsys):
    assert Artifact(zoo_serve_artifact).verify() == []
    assert main(["inspect", str(zoo_serve_artifact)]) == 0
    assert Pipeline.from_artifact(zoo_serve_artifact, backend="torch-cpu")(steps=1, seed=0)[0].size == (16, 16)
