"""The build folder: stage cache, finished outputs, manifest, and their verification.

```
<out>/manifest.json  report.json  report.md  plots/  samples/  model/  onnx/  bundle/  remote/  stages/
```
Every stage writes into ``stages/.tmp-*`` and is renamed into place when complete, with a
``files.json`` listing the sha256 of what it wrote; the manifest is written last and lists the sha256
of every file outside ``stages/`` and the digest of every stage folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from deploykit.errors import InputError
from deploykit.io import atomic_write_json, sha256_file
from deploykit.paths import OutsideFolder, inside, links_leaving

FILES_JSON = "files.json"
MANIFEST = "manifest.json"
STAGES = "stages"
LOCK = ".lock"
# Top-level outputs a build owns; replaced whole on each finalize.
OUTPUT_DIRS = ("model", "onnx", "onnx_int8", "engines", "bundle", "plots", "samples")
# Written by `deploykit bench --host` (device figures of the artifact's bundle), kept across builds that leave
# the bundle as it was.
REMOTE_DIR = "remote"


def list_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        # dot-names are scratch (temporary files, the lock, checkpoints): never part of the content
        if p.is_file() and rel.parts[0] not in exclude and not any(part.startswith(".") for part in rel.parts):
            out.append(p)
    return out


def hash_folder(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in list_files(folder, exclude)}


def digest(files: dict[str, str]) -> str:
    """One hash for a folder's content: its sorted (path, sha256) list."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def seal_stage(folder: Path) -> str:
    """Record the sha256 of every file a stage wrote; returns the folder's digest."""
    files = hash_folder(folder, exclude=(FILES_JSON,))
    atomic_write_json(folder / FILES_JSON, files)
    return digest(files)


def escaping_links(folder: Path, root: Path, shown_as: str = "") -> list[str]:
    """One problem per symlink under ``folder`` leading outside ``root``; ``shown_as`` prefixes the paths."""
    prefix = f"{shown_as}/" if shown_as else ""
    return [f"{prefix}{rel}: a symlink leading outside the artifact (to {target})"
            for rel, target in links_leaving(folder, root).items()]


def verify_stage(folder: Path) -> tuple[str | None, list[str]]:
    """Returns (digest, problems); a stage with problems must not be reused.

    Nothing outside ``folder`` is read: a symlink leading out of it is a problem found before any
    file is hashed, and so is a ``files.json`` entry that names a path outside it.
    """
    if folder.is_symlink():
        return None, [f"{folder.name}: a symlink (to {os.path.realpath(folder)}), not the stage's own folder"]
    links = escaping_links(folder, folder, folder.name)
    if links:
        return None, links
    listing = folder / FILES_JSON
    if not listing.is_file():
        return None, [f"{folder.name}: no {FILES_JSON}"]
    try:
        recorded = json.loads(listing.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, [f"{folder.name}: {FILES_JSON} is not valid JSON"]
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return None, [f"{folder.name}/{FILES_JSON}: not an object of path: sha256 entries"]
    outside = [f"{folder.name}/{FILES_JSON}: entry {e}" for e in _outside_entries(folder, recorded)]
    if outside:
        return None, outside
    actual = hash_folder(folder, exclude=(FILES_JSON,))
    problems = [f"{folder.name}/{rel}: " + ("missing" if rel not in actual else "sha256 differs")
                for rel, sha in recorded.items() if actual.get(rel) != sha]
    problems += [f"{folder.name}/{rel}: not listed in {FILES_JSON}" for rel in actual if rel not in recorded]
    problems += _architecture_problems(folder, recorded, folder.name)
    return digest(recorded), problems


def _architecture_problems(folder: Path, rels: Iterable[str], shown_as: str = "") -> list[str]:
    """Each listed architecture.json that the model loader would refuse (a path where an object belongs)."""
    from deploykit.models.architecture import ARCH_NAME, read_architecture

    problems = []
    for rel in rels:
        if rel.rsplit("/", 1)[-1] == ARCH_NAME and (folder / rel).is_file():
            try:
                read_architecture(folder / rel, f"{shown_as}/{rel}" if shown_as else rel)
            except InputError as e:
                problems.append(str(e))
    return problems


def _outside_entries(root: Path, paths: Iterable[object]) -> list[str]:
    """Why each of ``paths`` (relative to ``root``) leaves it; empty when all stay inside."""
    problems = []
    for rel in paths:
        try:
            inside(root, rel)
        except OutsideFolder as e:
            problems.append(str(e))
    return problems


def package_versions() -> dict[str, str]:
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions[name.lower()] = dist.version
    return dict(sorted(versions.items()))


class Artifact:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.stages = self.root / STAGES

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def stage_dir(self, index: int, name: str, key: str) -> Path:
        return self.stages / f"{index:02d}-{name}-{key[:16]}"

    def work_dir(self, name: str, key: str) -> Path:
        """A scratch folder that survives a kill (checkpoints); removed when the stage completes."""
        return self.stages / f".work-{name}-{key[:16]}"

    def check_writable(self) -> None:
        """Refuse a folder that holds something else: a build replaces its output folders whole."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--out {self.root} is a file, not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.manifest_path.is_file() or self.stages.is_dir()):
            raise InputError(f"--out {self.root} is not empty and is not a deploykit artifact; choose a new folder")

    def clean_partial(self) -> list[str]:
        """Remove what an interrupted build left half-written (never a finished stage)."""
        removed = []
        if self.stages.is_dir():
            for p in self.stages.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    @contextmanager
    def lock(self):
        """One build per folder at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as f:  # "a": no truncation, so the file's mtime stays put
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"{self.root} is being built by another process") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def write_manifest(self, recipe: dict, recipe_path: str, stages: list[dict], extra: dict | None = None) -> dict:
        """``extra``: what else the build records (stages skipped and why, ``--set`` overrides)."""
        from deploykit import __version__

        manifest = {
            "format_version": 1,
            "deploykit": __version__,
            "recipe_path": recipe_path,
            "recipe": recipe,
            "stages": stages,
            **(extra or {}),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "packages": package_versions(),
            "files": hash_folder(self.root, exclude=(STAGES, MANIFEST)),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def update_files(self, changed: Iterable[str], removed: Iterable[str] = ()) -> dict:
        """Re-hash the files ``changed`` (paths relative to the root) in the manifest and drop ``removed`` ones,
        leaving every other entry as recorded (a remote bench adds figures without re-hashing GBs of graphs)."""
        manifest = self.read_manifest()
        files = {k: v for k, v in manifest.get("files", {}).items() if k not in set(removed)}
        for rel in changed:
            files[rel] = sha256_file(self.root / rel)
        manifest["files"] = dict(sorted(files.items()))
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def read_manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise InputError(f"{self.root}: not a deploykit artifact (no {MANIFEST})")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{self.manifest_path}: not valid JSON ({e})") from None
        self._check_paths(manifest)
        return manifest

    def _check_paths(self, manifest: object) -> None:
        """Every path the manifest gives (stage folders, file names) stays inside the artifact."""
        def refuse(entry: str, why: str) -> None:
            raise InputError(f"{self.manifest_path}: {entry}: {why}")

        if not isinstance(manifest, dict):
            refuse("the manifest", "must be a JSON object")
        stages, files = manifest.get("stages", []), manifest.get("files", {})
        if not isinstance(stages, list):
            refuse("stages", "must be a list")
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict) or not all(isinstance(stage.get(k), str) for k in ("name", "dir", "digest")):
                refuse(f"stages[{i}]", "must be an object with string name, dir and digest")
            for why in _outside_entries(self.stages, [stage["dir"]]):
                refuse(f"stages[{i}].dir", why)
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            refuse("files", "must be an object of path: sha256 entries")
        for why in _outside_entries(self.root, files):
            refuse("files", f"entry {why}")

    def verify(self) -> list[str]:
        """Every problem found: files changed, missing or added since the manifest was written."""
        manifest = self.read_manifest()
        links = escaping_links(self.root, self.root)
        if links:  # found before any hashing: a link's target is another of the user's files
            return links
        problems = []
        actual = hash_folder(self.root, exclude=(STAGES, MANIFEST))
        for rel, sha in manifest.get("files", {}).items():
            if rel not in actual:
                problems.append(f"{rel}: missing")
            elif actual[rel] != sha:
                problems.append(f"{rel}: sha256 differs from the manifest")
        problems += [f"{rel}: not in the manifest" for rel in actual if rel not in manifest.get("files", {})]
        problems += _architecture_problems(self.root, manifest.get("files", {}))
        for stage in manifest.get("stages", []):
            folder = self.stages / stage["dir"]
            if not folder.is_dir():
                problems.append(f"stages/{stage['dir']}: missing")
                continue
            found, stage_problems = verify_stage(folder)
            problems += [f"stages/{p}" for p in stage_problems]
            if found is not None and found != stage["digest"]:
                problems.append(f"stages/{stage['dir']}: digest differs from the manifest")
        return problems
