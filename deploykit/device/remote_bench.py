"""`deploykit bench ARTIFACT --host user@device`: time an artifact's bundle on the device over SSH.

Drives the device through :class:`deploykit.device.ssh.SSH` (the system's OpenSSH client). Steps, each one
``ssh`` call:

1. probe: make the remote folder, hash what the device already has of the bundle, and name what is missing
   or different (a re-run copies only what changed: the multi-GB graphs once);
2. copy: those files as a tar stream piped through ssh into ``tar -xf -`` on the device (no sftp / scp needed);
3. verify: ``run.py verify`` checks every file against bundle.json (sha256) on the device;
4. build (``--backend tensorrt``): ``build_engines.py`` (what ``build_engines.sh`` runs), which skips engines
   already built from the same graphs;
5. bench: ``run.py bench`` there; its results.json comes back on stdout.

The results then go into the artifact: ``remote/<host>/<backend>/`` and a ``<backend>@<host>`` entry in
report.json / report.md with the roofline estimate of the recipe's target beside it, each file written
atomically and the manifest updated last. A connection failure, a missing bundle or a non-zero exit on the
device is one message and a non-zero exit code; the artifact is left as it was.

The device is not trusted with the user's files: what it asks for in step 1 is sent only if bundle.json
lists it, and bundle.json names nothing outside the bundle (:func:`deploykit.device.bundle.read_manifest`).
Every word of a remote command line that comes from the user (the folder, the Python) is quoted for the
remote shell.
"""

from __future__ import annotations

import json
import shlex
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploykit.device.bundle import manifest_sha256, read_manifest
from deploykit.device.ssh import SSH, SSH_FAILED
from deploykit.errors import DeployKitError, InputError

BACKENDS = ("tensorrt", "onnxruntime-cpu")
BUNDLE = "bundle"


class RemoteError(DeployKitError):
    """The device could not be reached, or a step failed there (exit code 1)."""


def remote_dir(text: str) -> str:
    """A path the remote shell gets quoted; ``~/x`` is taken relative to the login folder (where ssh starts),
    and a relative path starting with ``-`` gets ``./`` so that mkdir and cd read it as a folder, not options."""
    if text in ("~", "~/"):
        return "."
    text = text[2:] if text.startswith("~/") else text
    return "./" + text if text.startswith("-") else text


def quote_python(python: str) -> str:
    """``--remote-python`` as the remote shell should run it: a program and its arguments
    (``/usr/bin/env python3``), each word quoted, so that nothing in it is expanded or run there."""
    try:
        words = shlex.split(python)
    except ValueError as e:
        raise InputError(f"--remote-python {python!r}: {e} (a program and its arguments, quoted as in a shell)") from None
    if not words:
        raise InputError("--remote-python is empty")
    return " ".join(shlex.quote(w) for w in words)


# run on the device by `python3 -c`: hash what is there of the bundle, name what to send (stdin: {path: sha256})
_PROBE = """\
import hashlib, json, platform, sys
want = json.load(sys.stdin)
need = []
for rel, sha in sorted(want.items()):
    h = hashlib.sha256()
    try:
        with open(rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        need.append(rel)
        continue
    if h.hexdigest() != sha:
        need.append(rel)
print(json.dumps({"need": need, "python": platform.python_version(), "machine": platform.machine()}))
"""


@dataclass
class RemoteBench:
    artifact: Path
    ssh: SSH
    backend: str = "tensorrt"
    remote_dir: str | None = None
    remote_python: str = "python3"
    runs: int | None = None
    warmup: int | None = None
    say: Callable[[str], None] = print

    def _fail(self, step: str, rc: int, tail: list[str], hint: str = "") -> RemoteError:
        lines = [x for x in tail if x.strip()]
        detail = ("\n  " + "\n  ".join(lines[-8:])) if lines else ""
        if rc == SSH_FAILED:
            return RemoteError(f"ssh to {self.ssh.host} failed ({step}): exit status 255{detail}\n"
                               f"check the host, port, user and key: `ssh{' -p ' + str(self.ssh.host.port) if self.ssh.host.port else ''} "
                               f"{self.ssh.host.destination} true` must log in without a prompt (deploykit runs ssh with "
                               "BatchMode=yes; a new host key needs an entry in known_hosts, or --ssh-option "
                               "StrictHostKeyChecking=accept-new)")
        if rc == 127:
            hint = hint or f"is `{self.remote_python}` on the device? (--remote-python PATH)"
        return RemoteError(f"{step} failed on {self.ssh.host} (exit status {rc}){detail}" + (f"\n{hint}" if hint else ""))

    def _bundle_files(self, probe: object, want: dict[str, str], out: str) -> list[str]:
        """The files the probe's answer asks for, each one bundle.json lists: a device that names any other
        path (an absolute one, ``..``, a file of the user's) is refused before anything is sent."""
        need = probe.get("need") if isinstance(probe, dict) else None
        if not isinstance(need, list):
            raise RemoteError(f"{self.ssh.host}: unexpected answer from the probe: {out[-500:]!r}")
        foreign = [rel for rel in need if not isinstance(rel, str) or rel not in want]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise RemoteError(f"the device {self.ssh.host} asked for {str(foreign[0])[:200]!r}{more}, which is not a "
                              "file of the bundle (bundle.json): nothing was sent. deploykit sends only the bundle's "
                              "own files; check what runs as --remote-python on that device")
        return sorted(set(need))

    def run(self) -> tuple[dict, dict]:
        """Copy, build, bench on the device; returns (results, meta) without writing anything locally."""
        from deploykit.runtime.files import VerifiedArtifact

        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend}: the bundle runs {' or '.join(BACKENDS)}")
        files = VerifiedArtifact(self.artifact)
        if not files.has(f"{BUNDLE}/bundle.json"):
            raise InputError(f"{self.artifact} has no bundle/: build it from a recipe with a Jetson target and a bundle "
                             "stage (recipes/sd15_jetson.yaml)")
        py = quote_python(self.remote_python)
        bundle = files.folder(BUNDLE)  # every file hashed against the artifact's manifest
        manifest = read_manifest(bundle)  # every path it names inside the bundle
        bundle_sha = manifest_sha256(bundle)
        want = {**manifest["files"], "bundle.json": bundle_sha}
        name = manifest.get("recipe") or self.artifact.name
        where = remote_dir(self.remote_dir or f"deploykit-bundles/{name}") + f"/{BUNDLE}"
        d = shlex.quote(where)

        # 1. probe
        self.say(f"{self.ssh.host}: checking {where} ...")
        rc, out, tail = self.ssh.run(f"mkdir -p {d} && cd {d} && {py} -c {shlex.quote(_PROBE)}", json.dumps(want).encode())
        if rc != 0:
            raise self._fail("connecting and probing the bundle folder", rc, tail)
        try:
            probe = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise RemoteError(f"{self.ssh.host}: unexpected answer from the probe: {out[-500:]!r}") from None
        need = self._bundle_files(probe, want, out)

        # 2. copy what is missing or different, as a tar stream through ssh
        if need:
            size = sum((bundle / rel).stat().st_size for rel in need)
            self.say(f"{self.ssh.host}: copying {len(need)} of {len(want)} files ({size / 2**20:.1f} MiB) to {where}")
            started = time.perf_counter()

            def send(pipe) -> None:
                def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    return info
                with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for rel in need:
                        tar.add(bundle / rel, arcname=rel, recursive=False, filter=clean)

            rc, _, tail = self.ssh.run(f"cd {d} && tar -xf -", send)
            if rc != 0:
                raise self._fail("copying the bundle", rc, tail)
            self.say(f"{self.ssh.host}: copied in {time.perf_counter() - started:.1f} s")
        else:
            self.say(f"{self.ssh.host}: the bundle is already there")

        # 3. verify on the device
        rc, _, tail = self.ssh.run(f"cd {d} && {py} run.py verify")
        if rc != 0:
            raise self._fail("verifying the bundle (run.py verify)", rc, tail)

        # 4. build the engines there
        if self.backend == "tensorrt":
            self.say(f"{self.ssh.host}: building TensorRT engines (build_engines.sh; engines already built are kept)")
            rc, _, tail = self.ssh.run(f"cd {d} && {py} build_engines.py")
            if rc != 0:
                raise self._fail("building the engines (build_engines.py)", rc, tail,
                                 "TensorRT on the device: JetPack's python3-libnvinfer (or trtexec); see bundle/README.txt")

        # 5. bench
        args = (f" --runs {int(self.runs)}" if self.runs is not None else "") + \
            (f" --warmup {int(self.warmup)}" if self.warmup is not None else "")
        self.say(f"{self.ssh.host}: run.py bench --backend {self.backend}{args}")
        rc, out, tail = self.ssh.run(f"cd {d} && {py} run.py bench --backend {self.backend} --out results.json{args} "
                                     "&& cat results.json")
        if rc != 0:
            raise self._fail("the benchmark (run.py bench)", rc, tail)
        try:
            results = json.loads(out)
            for role in ("teacher", "student"):
                if not results[role]["p50_ms"] > 0:
                    raise ValueError(f"{role} p50 is {results[role]['p50_ms']}")
            results["speedup"] = float(results["speedup"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RemoteError(f"{self.ssh.host}: run.py bench did not return usable results ({e}): {out[-300:]!r}") from None
        if results.get("bundle_sha256") != bundle_sha:
            raise RemoteError(f"{self.ssh.host}: the results measured another bundle (bundle.json sha256 "
                              f"{results.get('bundle_sha256')}, expected {bundle_sha})")
        meta = {"host": str(self.ssh.host), "label": self.ssh.host.label, "backend": self.backend, "remote_dir": where,
                "python": probe.get("python"), "machine": probe.get("machine"), "bundle_sha256": bundle_sha,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "estimate": manifest.get("estimate")}
        return results, meta


def store(artifact: Path, results: dict, meta: dict) -> tuple[str, dict]:
    """Write one device run into the artifact: its folder under remote/, report.json, report.md, the manifest.
    Returns (report key, report entry). Each file is written atomically; the manifest last."""
    from deploykit.artifact import REMOTE_DIR, Artifact
    from deploykit.io import atomic_write_json, atomic_write_text
    from deploykit.report import remote
    from deploykit.report.markdown import render

    art = Artifact(artifact)
    with art.lock():
        bundle = art.root / BUNDLE / "bundle.json"
        if not bundle.is_file() or manifest_sha256(bundle.parent) != meta["bundle_sha256"]:
            raise RemoteError(f"{artifact}: the bundle changed while it was being benchmarked (a build ran?); "
                              "nothing written: run deploykit bench again")
        report_path = art.root / "report.json"
        try:
            report = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{report_path}: cannot read the artifact's report ({e})") from None
        folder = f"{REMOTE_DIR}/{remote.slug(meta['label'])}/{meta['backend']}"
        meta = {**meta, "results": f"{folder}/{remote.RESULTS}"}
        entry = remote.entry(results, meta)
        name = remote.key(meta)
        remote.add(report, name, entry, meta.get("estimate"))
        markdown = render(report)  # before writing: a report that does not render leaves everything as it was
        atomic_write_json(art.root / folder / remote.RESULTS, results)
        atomic_write_json(art.root / folder / remote.META, meta)
        atomic_write_json(report_path, report)
        atomic_write_text(art.root / "report.md", markdown)
        art.update_files([f"{folder}/{remote.RESULTS}", f"{folder}/{remote.META}", "report.json", "report.md"])
    return name, entry
