"""Jetson targets: the recipes, the device bundle (run with ONNX Runtime on the CPU standing in for TensorRT),
and `deploykit bench --host` over a real SSH connection to an sshd this test starts on 127.0.0.1."""

from __future__ import annotations

import getpass
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.errors import InputError
from tests.conftest import REPO, run_cli
from tests.device_servers import NO_DEPLOYKIT, free_port
from tests.device_servers import jetson_artifact as build_jetson_artifact


def run_bundle(script: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_DEPLOYKIT, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_py_verify_checks_the_files_and_pillow(jetson_artifact):
    run_py = jetson_artifact / "bundle" / "run.py"
    result = run_bundle(run_py, "verify")
    assert result.returncode == 0 and "numpy and Pillow import" in result.stderr, result.stderr
    result = run_bundle(run_py, "verify", env={**os.environ, "BLOCK_IMPORTS": "PIL"})
    assert result.returncode == 2 and "python3-pil" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_run_py_feeds_constants_by_role(bundle_run):
    """What bundle.json says about SDXL's time_ids (io_spec's constant) reaches the UNet as the host describes it."""
    from deploykit.models.io_spec import SDXLUNetIO

    manifest = {"scheduler": {"config": {"num_train_timesteps": 10}}, "bench": {"inputs": [
        {"name": "sample", "dtype": "float16", "shape": [2, 4, 8, 8], "role": "sample"},
        {"name": "timestep", "dtype": "float32", "shape": [], "role": "timestep"},
        {"name": "time_ids", "dtype": "float32", "shape": [2, 6], "role": "time_ids", "value": SDXLUNetIO.time_ids(64, 64)}]}}
    feeds = bundle_run.unet_feeds(manifest, seed=0)
    assert feeds["sample"].dtype == np.float16 and feeds["sample"].shape == (2, 4, 8, 8)
    assert feeds["timestep"].shape == () and 0 <= feeds["timestep"] < 10
    assert feeds["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


@pytest.fixture(scope="module")
def jetson_artifact(tmp_path_factory) -> Path:
    """The tiny SD pipeline with a Jetson recipe: prune, export, bundle (about a minute on 2 cores; once a session)."""
    return build_jetson_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle_run(jetson_artifact):
    """The artifact's run.py, imported as a module (it imports nothing from deploykit)."""
    spec = importlib.util.spec_from_file_location("bundle_run_py", jetson_artifact / "bundle" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize("path, target, round_to, resolution", [
    ("recipes/sd15_jetson.yaml", "jetson-agx-orin", 64, 512),
    ("recipes/sd15_jetson_nano.yaml", "jetson-orin-nano", 32, 384),
])
def test_jetson_recipes_load(path, target, round_to, resolution):
    from deploykit.recipe import load_recipe

    recipe = load_recipe(REPO / path)
    assert recipe.target == target and recipe.resolution == resolution
    assert dict((s.name, c) for s, c in recipe.plan())["prune"].round_to == round_to  # by target
    assert recipe.stage("bundle") is not None and recipe.stage("engine") is None
    assert recipe.topology == "sd15"  # --random-weights builds it offline
    result = run_cli("recipe", "check", path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("body, expected", [
    ("target: jetson-agx-orin\nstages:\n  - stage: prune\n  - stage: export\n  - stage: engine\n", "built on the device"),
    ("target: jetson-agx-orin\nstages:\n  - stage: prune\n  - stage: export\n", "needs a bundle stage"),
    ("target: jetson-orin-nano\nstages:\n  - stage: prune\n  - stage: export\n  - stage: bundle\n  - stage: bench\n"
     "    backends: [torch-cuda]\n", "not the jetson-orin-nano's"),
    ("target: jetson-agx-orin\nstages:\n  - stage: prune\n  - stage: export\n  - stage: bundle\n    onnx: fp16\n",
     "export.fp16"),
    ("target: cuda\nstages:\n  - stage: prune\n  - stage: export\n  - stage: bundle\n", "Jetson target"),
    ("target: jetson-agx-orin\nstages:\n  - stage: prune\n  - stage: bundle\n", "add an export stage"),
    ("target: jetson-agx-orin\nstages:\n  - stage: prune\n  - stage: export\n  - stage: bundle\n    precision: int8\n",
     "quantize stage"),
])
def test_jetson_recipes_are_checked(tmp_path, body, expected):
    from deploykit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: t\nteacher: random:tiny-sd\n" + body)
    with pytest.raises(InputError, match=expected):
        load_recipe(path)


def test_a_local_cpu_bench_is_allowed_beside_the_bundle(tmp_path):
    from deploykit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: t\nteacher: random:tiny-sd\ntarget: jetson-orin-nano\nstages:\n  - stage: prune\n"
                    "  - stage: export\n  - stage: bundle\n  - stage: bench\n    backends: [onnxruntime-cpu]\n")
    assert dict((s.name, c) for s, c in load_recipe(path).plan())["prune"].round_to == 32


# ----------------------------------------------------------------------------------------------
# the bundle, on this machine


def test_bundle_is_self_contained_and_hashed(jetson_artifact):
    bundle = jetson_artifact / "bundle"
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["target"] == "jetson-agx-orin" and manifest["kind"] == "sd" and manifest["batch"] == 2
    assert set(manifest["components"]) == {"teacher/unet", "student/unet", "student/text_encoder", "student/vae_decoder"}
    unet = manifest["components"]["student/unet"]
    assert unet["profile"]["sample"] == [[1, 4, 16, 16], [2, 4, 16, 16], [2, 4, 16, 16]]
    assert unet["profile"]["encoder_hidden_states"][1] == [2, 77, 32] and not unet["sparse"] and not unet["int8"]
    assert manifest["bench"]["inputs"][0] == {"name": "sample", "dtype": "float32", "shape": [2, 4, 16, 16], "role": "sample"}
    assert [(t["name"], t["role"]) for t in unet["inputs"]] == [("sample", "sample"), ("timestep", "timestep"),
                                                                ("encoder_hidden_states", "text")]
    assert manifest["components"]["student/vae_decoder"]["outputs"] == [{"name": "sample", "role": "image"}]
    assert manifest["components"]["student/vae_decoder"]["profile"]["latent_sample"][1] == [1, 4, 16, 16]
    assert manifest["pipeline"]["vae_scale"] == 2 and manifest["pipeline"]["vae_scaling_factor"] == 0.18215
    for name in ("run.py", "build_engines.py", "build_engines.sh", "README.txt"):
        assert name in manifest["files"], name
    # the device scripts are deploykit's, under their device names, copied as they are
    from deploykit.device.bundle import SCRIPTS_DIR

    for name in ("run.py", "build_engines.py"):
        assert (bundle / name).read_bytes() == (SCRIPTS_DIR / name).read_bytes(), name
    from deploykit.io import sha256_file

    assert all(sha256_file(bundle / rel) == sha for rel, sha in manifest["files"].items())
    est = manifest["estimate"]
    assert est["device"]["name"] == "Jetson AGX Orin 64GB" and est["precision"] == "fp16"
    assert est["student"]["ms"] < est["teacher"]["ms"]
    readme = (bundle / "README.txt").read_text()
    assert "sh build_engines.sh" in readme and "run.py bench --backend tensorrt" in readme
    report = json.loads((jetson_artifact / "report.json").read_text())
    assert report["target"] == "jetson-agx-orin" and report["bundle"]["files"] == len(manifest["files"])
    assert "Device bundle `bundle/` for the jetson-agx-orin" in (jetson_artifact / "report.md").read_text()
    assert run_cli("inspect", str(jetson_artifact)).returncode == 0


def test_bundle_benches_with_the_cpu_stand_in_and_no_deploykit(jetson_artifact, tmp_path):
    out = tmp_path / "results.json"
    result = run_bundle(jetson_artifact / "bundle" / "run.py", "bench", "--backend", "onnxruntime-cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    print(result.stderr.strip().splitlines()[-1])
    assert results["backend"] == "onnxruntime-cpu" and results["shape"] == [2, 4, 16, 16]
    assert results["teacher"]["p50_ms"] > 0 and results["student"]["p50_ms"] > 0
    assert results["speedup"] == pytest.approx(results["teacher"]["p50_ms"] / results["student"]["p50_ms"])
    assert results["teacher"]["runs"] == results["student"]["runs"] == 5
    assert results["device"]["name"] and results["bundle_sha256"]
    # TensorRT is not here: a clear message, not a traceback
    result = run_bundle(jetson_artifact / "bundle" / "run.py", "bench", "--backend", "tensorrt", "--out", str(out))
    assert result.returncode == 2 and "build_engines.sh" in result.stderr and "Traceback" not in result.stderr


def test_run_py_serve_answers_with_an_image(jetson_artifact):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", NO_DEPLOYKIT, str(jetson_artifact / "bundle" / "run.py"), "serve",
                             "--backend", "onnxruntime-cpu", "--port", str(port), "--no-warmup"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.5)
        assert health["kind"] == "sd" and health["backend"] == "onnxruntime-cpu" and health["height"] == 32
        request = urllib.request.Request(f"{url}/generate", data=json.dumps(
            {"prompt": "a red bicycle", "steps": 3, "seed": 1}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["Content-Type"] == "image/png" and response.headers["X-Seed"] == "1"
            data = response.read()
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        assert image.size == (32, 32) and image.mode == "RGB"
        bad = urllib.request.Request(f"{url}/generate", data=b'{"steps": 3}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 422 and "prompt" in json.loads(err.value.read())["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_run_py_samples_as_deploykit_runtime_does(jetson_artifact, bundle_run, tmp_path):
    """Tokenizer, DDIM and the whole pipeline of run.py against transformers, diffusers and deploykit.runtime."""
    from transformers import CLIPTokenizer

    from deploykit.runtime import Pipeline, make_pipeline_scheduler, make_scheduler

    folder = jetson_artifact / "bundle" / "onnx" / "student" / "tokenizer"
    prompts = ["a photograph of an astronaut riding a horse", "  Two  CATS,\tdon't   fight!! 42 ", "Crème brûlée 中文",
               "x" * 300]
    reference = CLIPTokenizer.from_pretrained(folder)
    ours = bundle_run.ClipTokenizer(folder)
    for p in prompts:
        assert ours.encode(p) == reference(p, padding="max_length", max_length=77, truncation=True).input_ids, p
    # a vocabulary with merges: BPE as CLIP runs it
    merged = tmp_path / "tokenizer-merges"
    shutil.copytree(folder, merged, dirs_exist_ok=True)
    vocab = json.loads((merged / "vocab.json").read_text())
    merges = ["h e", "he l", "hel l", "l o</w>", "hell o</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab.setdefault("".join(m.split()), len(vocab))
    (merged / "vocab.json").write_text(json.dumps(vocab))
    (merged / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    reference = CLIPTokenizer.from_pretrained(merged)
    ours = bundle_run.ClipTokenizer(merged)
    for p in ["hello cat", "hellocat cats", "shell, hello!"]:
        assert ours.encode(p) == reference(p, padding="max_length", max_length=77, truncation=True).input_ids, p

    manifest = json.loads((jetson_artifact / "bundle" / "bundle.json").read_text())
    sched = manifest["scheduler"]
    for spacing in ("leading", "linspace", "trailing"):
        config = {**sched["config"], "timestep_spacing": spacing}
        ddim = bundle_run.DDIM(config, sched["clip_sample"], sched["set_alpha_to_one"])
        theirs = make_pipeline_scheduler("ddim", config)
        theirs.set_timesteps(7)
        assert ddim.timesteps(7).tolist() == theirs.timesteps.tolist(), spacing
        x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
        y = torch.from_numpy(x)
        for t in theirs.timesteps:
            eps = np.sin(x * (int(t) + 1) / 100).astype(np.float32)
            x = ddim.step(eps, int(t), x)
            y = theirs.step(torch.from_numpy(np.sin(y.numpy() * (int(t) + 1) / 100)), t, y).prev_sample
        np.testing.assert_allclose(x, y.numpy(), atol=1e-5, rtol=1e-4)
    # pixel UNets: DDIM as deploykit.runtime.make_scheduler sets it up (clipped x0, alpha_0 = 1)
    pixel = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
    ddim, theirs = bundle_run.DDIM(pixel, True, True), make_scheduler("ddim", pixel)
    theirs.set_timesteps(5)
    assert ddim.timesteps(5).tolist() == theirs.timesteps.tolist()
    x = np.random.default_rng(1).standard_normal((1, 1, 4, 4)).astype(np.float32)
    y = torch.from_numpy(x)
    for t in theirs.timesteps:
        x = ddim.step(np.cos(x), int(t), x)
        y = theirs.step(torch.cos(y), t, y).prev_sample
    np.testing.assert_allclose(x, y.numpy(), atol=1e-5, rtol=1e-4)

    # the same noise through run.py's ONNX Runtime pipeline and deploykit's: the same image
    generator = bundle_run.Generator(jetson_artifact / "bundle", manifest, "onnxruntime-cpu")
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = generator.generate("a red bicycle", "", 4, 7.5, 0, noise=noise.numpy())
    pipe = Pipeline.from_artifact(jetson_artifact, backend="onnxruntime-cpu")
    theirs = pipe.model.generate(noise, "ddim", 4, prompts=["a red bicycle"], negative_prompts=[""], guidance_scale=7.5)
    theirs = ((theirs[0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_build_script_drives_trtexec_where_python_tensorrt_is_missing(jetson_artifact, tmp_path):
    """No TensorRT here: a stand-in trtexec checks the command line the build script gives it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(jetson_artifact / "bundle", bundle)
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec '\"$*\"\n"
                    "echo \"$@\" >> \"$(dirname \"$0\")/calls.txt\"\n"
                    "for a in \"$@\"; do case $a in --saveEngine=*) echo engine > \"${a#--saveEngine=}\";; esac; done\n"
                    "echo '[V] [TRT] (Sparsity) Layers eligible for sparse math: /a/Conv, /b/Conv'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    result = run_bundle(bundle / "build_engines.py", "--trtexec", env=env)
    assert result.returncode == 0, result.stderr
    table = json.loads((bundle / "engines" / "engines.json").read_text())
    assert set(table) == {"teacher/unet", "student/unet", "student/text_encoder", "student/vae_decoder"}
    entry = table["student/unet"]
    assert entry["tensorrt"] == "10.3.0" and entry["engine"].endswith("_trt10.3.0_fp16.engine")
    assert entry["flags"] == ["FP16"] and entry["builder"] == "trtexec" and (bundle / entry["engine"]).is_file()
    calls = (fake.parent / "calls.txt").read_text().splitlines()
    unet_call = next(c for c in calls if "student/unet/model.onnx" in c)
    assert "--fp16" in unet_call and "--sparsity=enable" not in unet_call and "--skipInference" in unet_call
    assert "--minShapes=sample:1x4x16x16,encoder_hidden_states:1x77x32" in unet_call
    assert "--optShapes=sample:2x4x16x16,encoder_hidden_states:2x77x32" in unet_call
    assert f"--timingCacheFile={bundle / 'engines' / 'timing.cache'}" in unet_call
    assert "--memPoolSize=workspace:2048M" in unet_call
    # a second run finds every engine up to date
    result = run_bundle(bundle / "build_engines.py", "--trtexec", env=env)
    assert result.returncode == 0 and result.stderr.count("up to date") == 4, result.stderr
    builds = [c for c in (fake.parent / "calls.txt").read_text().splitlines() if c.startswith("--onnx=")]
    assert len(builds) == 4
    # a 2:4 student (what a sparsify stage makes bundle.json say): only its engine is built again, sparse
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["components"]["student/unet"]["sparse"] = True
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    result = run_bundle(bundle / "build_engines.py", "--trtexec", env=env)
    assert result.returncode == 0 and result.stderr.count("up to date") == 3, result.stderr
    builds = [c for c in (fake.parent / "calls.txt").read_text().splitlines() if c.startswith("--onnx=")]
    assert len(builds) == 5 and "student/unet" in builds[-1] and "--sparsity=enable" in builds[-1]
    entry = json.loads((bundle / "engines" / "engines.json").read_text())["student/unet"]
    assert entry["engine"].endswith("_trt10.3.0_fp16-sparse.engine") and entry["flags"] == ["FP16", "SPARSE_WEIGHTS"]
    assert entry["sparse_layers"] == {"eligible": 2, "picked": 0}


# ----------------------------------------------------------------------------------------------
# deploykit bench --host, over SSH to localhost


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 with a generated host key, accepting one generated client key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    missing = [name for name in ("ssh", "ssh-keygen") if shutil.which(name) is None]
    if not os.access(binary, os.X_OK) or missing:
        reason = f"no OpenSSH server ({binary})" if not missing else f"no {', '.join(missing)}"
        print(f"skipping the SSH tests: {reason}; apt-get install openssh-server (.ci/run does)")
        pytest.skip(f"{reason}: apt-get install openssh-server")
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    try:  # sshd refuses to start without its privilege-separation folder
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        print(f"skipping the SSH tests: cannot create /run/sshd ({e})")
        pytest.skip(f"sshd needs /run/sshd, which cannot be created here ({e})")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        f"PidFile {folder / 'sshd.pid'}\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nAllowTcpForwarding no\nX11Forwarding no\n")
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {(folder / 'host_key.pub').read_text()}")
    log = open(folder / "sshd.log", "w")
    proc = subprocess.Popen([binary, "-D", "-e", "-p", str(port), "-f", str(folder / "sshd_config")], stdout=log,
                            stderr=subprocess.STDOUT)
    user = getpass.getuser()
    options = ["-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes"]
    try:
        deadline = time.monotonic() + 20
        while True:
            check = subprocess.run(["ssh", *options, "-o", "BatchMode=yes", "-i", str(folder / "client_key"), "-p",
                                    str(port), f"{user}@127.0.0.1", "true"], capture_output=True, text=True, timeout=30)
            if check.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                message = f"sshd did not accept the test key: {check.stderr.strip()} / {(folder / 'sshd.log').read_text()}"
                print(f"skipping the SSH tests: {message}")
                pytest.skip(message)
            time.sleep(0.3)
        yield {"port": port, "user": user, "key": folder / "client_key", "known_hosts": folder / "known_hosts",
               "folder": folder}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def bench_args(sshd, artifact: Path, remote_dir: Path, host: str | None = None, *extra: str) -> list[str]:
    return ["bench", str(artifact), f"--host={host or sshd['user'] + '@127.0.0.1:' + str(sshd['port'])}",
            "--identity", str(sshd["key"]), "--ssh-option", f"UserKnownHostsFile={sshd['known_hosts']}",
            "--ssh-option", "StrictHostKeyChecking=yes", "--backend", "onnxruntime-cpu",
            "--remote-python", sys.executable, "--remote-dir", str(remote_dir), *extra]


def test_remote_bench_over_ssh(sshd, jetson_artifact, tmp_path):
    remote_dir = tmp_path / "device"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_cli(*bench_args(sshd, jetson_artifact, remote_dir), env=env)
    assert result.returncode == 0, result.stderr
    assert "copying" in result.stderr and "Traceback" not in result.stderr
    print(result.stderr[-600:])
    name = f"onnxruntime-cpu@127.0.0.1:{sshd['port']}"
    report = json.loads((jetson_artifact / "report.json").read_text())
    entry = report["remote"][name]
    results = json.loads((jetson_artifact / entry["results"]).read_text())
    assert entry["results"] == f"remote/127.0.0.1-{sshd['port']}/onnxruntime-cpu/results.json"
    t, s = results["teacher"]["p50_ms"], results["student"]["p50_ms"]
    assert t > 0 and s > 0 and results["speedup"] == pytest.approx(t / s)
    assert report["speedup"][name] == pytest.approx(t / s) and entry["speedup"] == pytest.approx(t / s)
    assert report["teacher"]["latency"][name]["p50_ms"] == t and report["student"]["latency"][name]["p50_ms"] == s
    assert entry["stand_in"] and entry["estimate"]["target"] == "jetson-agx-orin"
    assert entry["estimate"]["teacher_ms"] > 0 and "teacher_measured_over_estimate" not in entry["estimate"]
    md = (jetson_artifact / "report.md").read_text()
    assert "On the device" in md and name in md and f"**{t / s:.2f}x**" in md and "stand-in" in md
    # the bundle is on the device, checked; the artifact's manifest covers the new files
    assert (remote_dir / "bundle" / "run.py").is_file() and (remote_dir / "bundle" / "results.json").is_file()
    assert run_cli("inspect", str(jetson_artifact)).returncode == 0

    # a second run copies nothing
    again = run_cli(*bench_args(sshd, jetson_artifact, remote_dir, None, "--runs", "3", "--warmup", "0"), env=env)
    assert again.returncode == 0 and "already there" in again.stderr, again.stderr
    report = json.loads((jetson_artifact / "report.json").read_text())
    assert report["remote"][name]["teacher"]["runs"] == 3

    # a build that leaves the bundle as it was keeps the device figures
    result = run_cli("build", str(jetson_artifact.parent / "recipe.yaml"), "--out", str(jetson_artifact), env=env)
    assert result.returncode == 0, result.stderr
    assert name in json.loads((jetson_artifact / "report.json").read_text())["remote"]
    assert run_cli("inspect", str(jetson_artifact)).returncode == 0


def _snapshot(artifact: Path) -> dict:
    return {p.relative_to(artifact).as_posix(): p.read_bytes() for p in artifact.rglob("*")
            if p.is_file() and "stages" not in p.relative_to(artifact).parts and p.name != ".lock"}


@pytest.mark.parametrize("case", ["closed-port", "bad-python", "bad-host-text"])
def test_remote_failures_are_one_message_and_change_nothing(sshd, jetson_artifact, tmp_path, case):
    before = _snapshot(jetson_artifact)
    if case == "closed-port":
        args = bench_args(sshd, jetson_artifact, tmp_path / "d", f"{sshd['user']}@127.0.0.1:{free_port()}")
        code, message = 1, "ssh to"
    elif case == "bad-python":
        args = bench_args(sshd, jetson_artifact, tmp_path / "d")
        args[args.index("--remote-python") + 1] = "/nonexistent/python3"
        code, message = 1, "--remote-python"
    else:
        args = bench_args(sshd, jetson_artifact, tmp_path / "d", "-oProxyCommand=touch /tmp/x")
        code, message = 2, "expected user@device"
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert _snapshot(jetson_artifact) == before


def test_an_artifact_without_a_bundle_is_refused(sshd, jetson_artifact, tmp_path):
    from deploykit.artifact import Artifact

    copy = tmp_path / "art"
    shutil.copytree(jetson_artifact, copy, ignore=shutil.ignore_patterns("stages", "remote"))
    shutil.rmtree(copy / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    Artifact(copy).update_files([], removed=[f for f in manifest["files"] if f.startswith(("bundle/", "remote/"))])
    result = run_cli(*bench_args(sshd, copy, tmp_path / "d"))
    assert result.returncode == 2 and "has no bundle/" in result.stderr and "Traceback" not in result.stderr


def test_a_tensorrt_run_goes_into_the_report_beside_its_estimate(jetson_artifact):
    """What a TensorRT run on the device adds to the report (results as run.py writes them there; no GPU here)."""
    from deploykit.report import remote
    from deploykit.report.markdown import render

    report = json.loads((jetson_artifact / "report.json").read_text())
    bundle = json.loads((jetson_artifact / "bundle" / "bundle.json").read_text())
    est = bundle["estimate"]
    results = {"device": {"name": "NVIDIA Jetson AGX Orin Developer Kit", "gpu": "NVIDIA Jetson AGX Orin Developer Kit"},
               "precision": "fp16", "shape": [2, 4, 64, 64], "started": "2026-01-01T00:00:00+0000", "bundle_sha256": "x",
               "teacher": {"p50_ms": 30.0, "p90_ms": 31.0, "runs": 50}, "student": {"p50_ms": 15.0, "p90_ms": 16.0, "runs": 50},
               "speedup": 2.0, "speedup_pair_median": 1.98,
               "engines": {"student/unet": {"engine": "engines/student/unet/x_trt10.3.0_fp16-sparse.engine", "tensorrt": "10.3.0",
                                            "flags": ["FP16", "SPARSE_WEIGHTS"], "sparse_layers": {"eligible": 40, "picked": 12}}}}
    meta = {"host": "me@orin", "label": "orin", "backend": "tensorrt", "results": "remote/orin/tensorrt/results.json",
            "estimate": est}
    remote.add(report, remote.key(meta), remote.entry(results, meta), est)
    assert report["speedup"]["tensorrt@orin"] == 2.0 and report["student"]["latency"]["tensorrt@orin"]["p50_ms"] == 15.0
    assert report["estimate"]["tensorrt@orin"]["teacher"]["measured_over_estimate"] == pytest.approx(30.0 / est["teacher"]["ms"])
    entry = report["remote"]["tensorrt@orin"]
    assert not entry["stand_in"] and entry["estimate"]["student_measured_over_estimate"] == pytest.approx(15.0 / est["student"]["ms"])
    md = render(report)
    assert "| tensorrt@orin | NVIDIA Jetson AGX Orin Developer Kit | fp16 | 2x4x64x64 | 30.00 | 15.00 | **2.00x**" in md
    assert "12 of 40 layers eligible for sparse math ran sparse" in md
    assert "| tensorrt@orin | teacher |" in md  # the roofline table beside the measurement


# ----------------------------------------------------------------------------------------------
# a hostile device, a hostile bundle, a careless command line


def test_remote_words_are_arguments_to_the_remote_shell():
    from deploykit.device.remote_bench import quote_python, remote_dir

    assert remote_dir("-rf x") == "./-rf x" and remote_dir("~/a b") == "a b" and remote_dir("~") == "."
    assert quote_python("/usr/bin/env python3") == "/usr/bin/env python3"  # a program and its arguments
    assert quote_python("python3; rm -rf ~") == "'python3;' rm -rf '~'"  # each word quoted: nothing runs
    with pytest.raises(InputError, match="--remote-python"):
        quote_python("'unbalanced")


def _fake_python(path: Path, need: list[str]) -> Path:
    """A device whose Python answers the probe with ``need`` and runs everything else as the real one does."""
    answer = json.dumps({"need": need, "python": "3.10.12", "machine": "aarch64"})
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then cat >/dev/null; printf '%s\\n' '{answer}'; exit 0; fi\n"
                    f"exec {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("asks", ["absolute", "dotdot"])
def test_a_device_that_asks_for_other_files_gets_nothing(sshd, jetson_artifact, tmp_path, asks):
    """The device's answer to the probe named a file of the user's: refused (exit 1, naming the device), nothing
    sent. Before: the file went into the tar stream (an absolute path as it is, `..` resolved from the bundle)."""
    secret = tmp_path / "home" / ".ssh" / "id_ed25519"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    remote = tmp_path / "device"
    need = str(secret) if asks == "absolute" else os.path.relpath(secret, jetson_artifact / "bundle")
    before = _snapshot(jetson_artifact)
    args = bench_args(sshd, jetson_artifact, remote)
    args[args.index("--remote-python") + 1] = str(_fake_python(tmp_path / "python", ["run.py", need]))
    result = run_cli(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"the device {sshd['user']}@127.0.0.1:{sshd['port']} asked for" in result.stderr
    assert "nothing was sent" in result.stderr
    assert not [p for p in remote.rglob("*") if p.is_file()]  # not even the files it may have
    assert _snapshot(jetson_artifact) == before


def test_remote_python_with_arguments_runs_the_engine_build(sshd, jetson_artifact, tmp_path):
    """--remote-python "/usr/bin/env PATH=... python3": one program with arguments, at every step. Before, the
    engine build ran `PYTHON=/usr/bin/env PATH=... python3 sh build_engines.sh`: python3 given `sh` to run."""
    fake = tmp_path / "bin" / "trtexec"  # no TensorRT here: a stand-in that writes the engine file
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300]'\n"
                    "for a in \"$@\"; do case $a in --saveEngine=*) echo engine > \"${a#--saveEngine=}\";; esac; done\n")
    fake.chmod(0o755)
    remote = tmp_path / "device"
    args = bench_args(sshd, jetson_artifact, remote)
    args[args.index("--backend") + 1] = "tensorrt"
    args[args.index("--remote-python") + 1] = f"/usr/bin/env PATH={fake.parent}:/usr/bin:/bin OMP_NUM_THREADS=1 {sys.executable}"
    result = run_cli(*args)
    # the engines were built; the bench then needs TensorRT's runtime, which is not here
    assert (remote / "bundle" / "engines" / "engines.json").is_file(), result.stderr
    assert result.returncode == 1 and "the benchmark (run.py bench) failed" in result.stderr, result.stderr
    assert "TensorRT" in result.stderr and "Traceback" not in result.stderr


def test_a_remote_dir_with_shell_metacharacters_is_a_folder_name(sshd, jetson_artifact, tmp_path):
    marks = ["PWNED-1", "PWNED-2", "PWNED-3"]
    for mark in marks:
        assert not (Path.home() / mark).exists()
    remote = tmp_path / "dev ice" / f"it's $(touch {marks[0]}) `touch {marks[1]}`; touch {marks[2]} & \"x\""
    result = run_cli(*bench_args(sshd, jetson_artifact, remote, None, "--runs", "1", "--warmup", "0"),
                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert (remote / "bundle" / "run.py").is_file() and (remote / "bundle" / "results.json").is_file()
    assert not [m for m in marks for where in (Path.home(), tmp_path, remote, remote / "bundle") if (where / m).exists()]


def _hostile_bundle(jetson_artifact: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    """A copy of the bundle whose bundle.json names a file outside it (``case``), with the right sha256, so that
    hashes alone would pass it; returns (bundle folder, the outside file)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(jetson_artifact / "bundle", bundle)
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "onnx" / "student" / "unet" / "model.onnx", outside)
    manifest = json.loads((bundle / "bundle.json").read_text())
    sha = manifest["files"]["onnx/student/unet/model.onnx"]
    if case == "files-dotdot":
        manifest["files"]["../outside.onnx"] = sha
    elif case == "files-absolute":
        manifest["files"][str(outside)] = sha
    elif case == "onnx-dotdot":
        manifest["files"]["../outside.onnx"] = sha
        manifest["components"]["student/unet"]["onnx"] = "../outside.onnx"
    elif case == "symlink":
        (bundle / "onnx" / "student" / "unet" / "model.onnx").unlink()
        (bundle / "onnx" / "student" / "unet" / "model.onnx").symlink_to(outside)
    elif case == "component":
        manifest["components"]["../../escaped"] = manifest["components"]["student/unet"]
    elif case == "tokenizer":
        manifest["pipeline"]["tokenizer"] = str(tmp_path)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle, outside


BAD_BUNDLES = ["files-dotdot", "files-absolute", "onnx-dotdot", "symlink", "component", "tokenizer"]


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_the_device_scripts_refuse_a_bundle_naming_paths_outside_it(jetson_artifact, tmp_path, case):
    """run.py and build_engines.py open nothing bundle.json names outside the bundle (before: the sha256 matched,
    so run.py verify passed and run.py would load the outside graph; build_engines.py would write engines/../../)."""
    bundle, _ = _hostile_bundle(jetson_artifact, tmp_path, case)
    result = run_bundle(bundle / "run.py", "verify")
    assert result.returncode == 2 and "names paths outside the bundle" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = run_bundle(bundle / "build_engines.py", "--dry-run")
    assert result.returncode != 0 and "names paths outside the bundle" in result.stderr, result.stderr
    assert not (tmp_path / "escaped").exists()


def test_run_py_refuses_an_engine_table_naming_paths_outside_the_bundle(jetson_artifact, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(jetson_artifact / "bundle", bundle)
    (tmp_path / "outside.engine").write_text("engine")
    (bundle / "engines").mkdir()
    (bundle / "engines" / "engines.json").write_text(json.dumps({"teacher/unet": {"engine": "../outside.engine"},
                                                                  "student/unet": {"engine": "../outside.engine"}}))
    result = run_bundle(bundle / "run.py", "bench", "--backend", "tensorrt", "--out", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "engines.json: engine '../outside.engine' goes up" in result.stderr, result.stderr


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_the_host_refuses_a_bundle_naming_paths_outside_it(jetson_artifact, tmp_path, case):
    from deploykit.device.bundle import read_manifest

    bundle, _ = _hostile_bundle(jetson_artifact, tmp_path, case)
    with pytest.raises(InputError, match="names paths outside the bundle"):
        read_manifest(bundle)


@pytest.mark.parametrize("case", ["files-dotdot", "files-absolute"])
def test_deploykit_bench_sends_nothing_from_a_bundle_naming_paths_outside_it(sshd, jetson_artifact, tmp_path, case):
    """An artifact from someone else whose bundle.json (its manifest re-hashed to match) lists a file outside the
    bundle: exit 2 before any connection. Before: the device found that file missing and the host sent it."""
    from deploykit.artifact import Artifact

    copy = tmp_path / "art"
    shutil.copytree(jetson_artifact, copy, ignore=shutil.ignore_patterns("stages", "remote"))
    shutil.rmtree(copy / "bundle")
    bundle, outside = _hostile_bundle(jetson_artifact, tmp_path / "made", case)
    shutil.copytree(bundle, copy / "bundle")
    if case == "files-dotdot":  # ../outside.onnx from the bundle: the artifact's own folder
        shutil.copy(outside, copy / "outside.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    Artifact(copy).update_files(["bundle/bundle.json"], removed=[f for f in manifest["files"] if f.startswith("remote/")])
    remote = tmp_path / "device"
    result = run_cli(*bench_args(sshd, copy, remote))
    assert result.returncode == 2 and "names paths outside the bundle" in result.stderr, result.stderr
    assert not remote.exists()
