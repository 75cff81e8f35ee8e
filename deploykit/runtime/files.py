"""Read an artifact's files only after checking them against its manifest.

A server runs whatever weights and graphs it loads, so every file the runtime opens is first hashed
and compared with ``manifest.json``: top-level files (``model/``, ``onnx/``, ``report.json``) directly,
files in the stage cache through the stage's ``files.json``, whose digest the manifest records. A
folder is accepted only whole: a file missing from it, changed, or added beside the listed ones
(an extra ``.onnx_data`` would be read by ONNX Runtime) is an error. Whether or not hashes are
checked, nothing outside the artifact is opened: a file or folder reached through a symlink leading
out of it is refused before it is read.
"""

from __future__ import annotations

from pathlib import Path

from deploykit.artifact import MANIFEST, Artifact, escaping_links, hash_folder, verify_stage
from deploykit.errors import InputError
from deploykit.io import sha256_file
from deploykit.paths import OutsideFolder, inside


class VerifiedArtifact:
    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"no such artifact folder: {self.root}")
        self.manifest = Artifact(self.root).read_manifest()
        self.files: dict[str, str] = self.manifest.get("files", {})
        self.verify = verify

    def _fail(self, problems: list[str]) -> None:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InputError(f"{self.root} does not match its {MANIFEST} (run `deploykit inspect` for every problem):\n  "
                         f"{shown}{more}")

    def has(self, rel: str) -> bool:
        """Whether the manifest lists the file ``rel`` or any file under the folder ``rel``."""
        return rel in self.files or any(f.startswith(rel.rstrip("/") + "/") for f in self.files)

    def _inside(self, rel: str) -> Path:
        """``root / rel``, refused where a symlink leads it, or anything under it, out of the artifact."""
        try:
            path = inside(self.root, rel)
        except OutsideFolder as e:
            raise InputError(f"{self.root}: {rel}: {e}") from None
        if path.is_dir():
            links = escaping_links(path, self.root, rel.rstrip("/"))
            if links:
                self._fail(links)
        return path

    def file(self, rel: str) -> Path:
        if rel not in self.files:
            raise InputError(f"{self.root}: {rel} is not in the artifact's {MANIFEST}")
        path = self._inside(rel)
        if not path.is_file():
            self._fail([f"{rel}: missing"])
        if self.verify and sha256_file(path) != self.files[rel]:
            self._fail([f"{rel}: sha256 differs from the manifest"])
        return path

    def folder(self, rel: str) -> Path:
        prefix = rel.rstrip("/") + "/"
        listed = {f: sha for f, sha in self.files.items() if f.startswith(prefix)}
        if not listed:
            raise InputError(f"{self.root}: the artifact has no {rel}/ folder")
        path = self._inside(rel)
        if self.verify:
            actual = {prefix + f: sha for f, sha in hash_folder(path).items()} if path.is_dir() else {}
            problems = [f"{f}: " + ("missing" if f not in actual else "sha256 differs from the manifest")
                        for f, sha in listed.items() if actual.get(f) != sha]
            problems += [f"{f}: not in the manifest" for f in actual if f not in listed]
            if problems:
                self._fail(problems)
        return path

    def stage(self, name: str) -> Path | None:
        """The folder of the manifest's stage ``name``, verified; None where the build had no such stage."""
        record = next((s for s in self.manifest.get("stages", []) if s.get("name") == name), None)
        if record is None:
            return None
        path = self._inside(f"stages/{record['dir']}")  # read_manifest has kept dir inside stages/
        if not path.is_dir():
            self._fail([f"stages/{record['dir']}: missing (the stage cache is needed for this backend)"])
        if self.verify:
            found, problems = verify_stage(path)
            if found is not None and found != record["digest"]:
                problems.append(f"stages/{record['dir']}: digest differs from the manifest")
            if problems:
                self._fail([p if p.startswith("stages/") else f"stages/{p}" for p in problems])
        return path
