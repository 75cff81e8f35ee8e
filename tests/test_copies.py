"""Code the device scripts repeat (``# Copied from deploykit...``) stays equal to its source: utils/check_copies.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def check_copies():
    spec = importlib.util.spec_from_file_location("check_copies", REPO / "utils" / "check_copies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_copy_in_deploykit_equals_its_source(check_copies):
    copies, drifts = check_copies.check([REPO / "deploykit"])
    assert not drifts, "\n\n".join(map(str, drifts))
    sources = {c.source for c in copies}
    # the device scripts carry the engine stage's builder and the shared helpers as marked copies
    assert {"deploykit.engines.tensorrt.build_engine", "deploykit.engines.tensorrt.tensorrt_missing",
            "deploykit.io.sha256_file", "deploykit.io.atomic_write_text",
            "deploykit.device.scripts.build_engines.log"} <= sources
    assert {c.path.name for c in copies} == {"run.py", "build_engines.py"}
    result = subprocess.run([sys.executable, str(REPO / "utils" / "check_copies.py")], capture_output=True, text=True)
    assert result.returncode == 0 and f"{len(copies)} copies, 0 drifted" in result.stderr, result.stderr


SOURCE = '''\
class Shape:
    def area(self, w: int, h: int) -> int:
        """The area."""
        return w * h


LIMIT = 4


def scaled(x: int) -> int:
    if x > LIMIT:
        raise ValueError("too big")
    return 2 * x
'''


def _tree(tmp_path, copy: str):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "geometry.py").write_text(SOURCE)
    (tmp_path / "pkg" / "script.py").write_text(textwrap.dedent(copy))
    return tmp_path / "pkg" / "script.py"


def test_an_equal_copy_passes_with_renames_and_indentation(check_copies, tmp_path):
    script = _tree(tmp_path, '''\
        # Copied from pkg.geometry.LIMIT
        LIMIT = 4


        # Copied from pkg.geometry.scaled with ValueError->RuntimeError, scaled->doubled
        def doubled(x: int) -> int:
            if x > LIMIT:
                raise RuntimeError("too big")
            return 2 * x


        class Box:
            # Copied from pkg.geometry.Shape.area
            def area(self, w: int, h: int) -> int:
                """The area."""
                return w * h
        ''')
    copies, drifts = check_copies.check([script], root=tmp_path)
    assert len(copies) == 3 and not drifts, "\n".join(map(str, drifts))


def test_a_drifted_copy_fails_and_is_fixed(check_copies, tmp_path):
    script = _tree(tmp_path, '''\
        # Copied from pkg.geometry.scaled
        def scaled(x: int) -> int:
            if x >= LIMIT:
                raise ValueError("too big")
            return 2 * x


        # Copied from pkg.geometry.gone
        def gone() -> None:
            pass


        # Copied from pkg.nowhere.scaled
        def elsewhere() -> None:
            pass
        ''')
    copies, drifts = check_copies.check([script], root=tmp_path)
    assert len(copies) == 3 and len(drifts) == 3
    drifted, missing, nowhere = drifts
    assert "differs from its source" in str(drifted) and "-    if x > LIMIT:" in str(drifted)
    assert "+    if x >= LIMIT:" in str(drifted) and str(drifted).startswith(f"{script}:2:")
    assert "names nothing in" in str(missing) and "names no module" in str(nowhere)
    check_copies.fix(drifts)
    assert check_copies.check([script], root=tmp_path)[1] == [missing, nowhere]  # the source-less ones stay reported
    assert "    if x > LIMIT:\n" in script.read_text()


def test_a_drifted_device_script_fails_the_check(check_copies, tmp_path):
    """The real thing: run.py with one copied line changed is reported against deploykit/io.py."""
    run_py = (REPO / "deploykit" / "device" / "scripts" / "run.py").read_text()
    drifted = tmp_path / "run.py"
    drifted.write_text(run_py.replace("while block := f.read(chunk):", "while block := f.read(chunk * 2):", 1))
    _, drifts = check_copies.check([drifted])
    assert [d.copy.source for d in drifts] == ["deploykit.io.sha256_file"]
    result = subprocess.run([sys.executable, str(REPO / "utils" / "check_copies.py"), str(drifted)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "copy of deploykit.io.sha256_file differs" in result.stderr
