"""deploykit.runtime.Pipeline: an artifact to images in one call, on a verified artifact, on the best backend."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deploykit.errors import InputError
from deploykit.runtime import Pipeline, Request, RequestError
from deploykit.runtime.choose import ArtifactParts, choose_backend, unavailable_reason
from tests.conftest import REPO


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_zoo_artifact_generates_on_the_best_backend(zoo_pipeline):
    assert zoo_pipeline.kind == "pixel" and zoo_pipeline.backend == "onnxruntime-cpu"  # no CUDA here
    images = zoo_pipeline(steps=4, seed=1, num_images=2)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "L"
    again = zoo_pipeline(steps=4, seed=1)
    np.testing.assert_array_equal(pixels(again[0]), pixels(images[0]))  # a seed is an image
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))     # a request's images differ


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++", "euler"])
def test_each_scheduler_runs_on_sd(sd_pipeline, scheduler):
    image = sd_pipeline("a red bicycle", steps=3, seed=0, scheduler=scheduler, guidance_scale=5.0)[0]
    arr = pixels(image)
    assert image.size == (32, 32) and image.mode == "RGB" and arr.std() > 0


def test_sd_torch_and_onnxruntime_agree(sd_serve_artifact, sd_pipeline):
    torch_pipe = Pipeline.from_artifact(sd_serve_artifact, backend="torch-cpu")
    kwargs = {"negative_prompt": "blurry", "steps": 3, "seed": 7, "guidance_scale": 6.0, "height": 40, "width": 24}
    a, b = torch_pipe("a lighthouse", **kwargs)[0], sd_pipeline("a lighthouse", **kwargs)[0]
    assert a.size == (24, 40)
    assert np.abs(pixels(a) - pixels(b)).max() <= 2  # the same student weights, two runtimes


@pytest.mark.parametrize("which", ["zoo", "sd"])
def test_a_batched_request_gets_the_image_it_gets_alone(which, zoo_pipeline, sd_pipeline):
    pipe = zoo_pipeline if which == "zoo" else sd_pipeline
    prompt = (lambda s: None) if which == "zoo" else (lambda s: s)
    requests = [pipe.prepare(Request(prompt=prompt(p), steps=3, seed=s, num_images=n, guidance_scale=4.0))
                for p, s, n in (("a cat", 11, 1), ("a dog", 12, 2), ("a cat", 13, 1))]
    batched = pipe.run_batch(requests)
    for request, images in zip(requests, batched):
        alone = pipe.run_batch([request])[0]
        assert len(images) == request.num_images
        for x, y in zip(images, alone):
            assert np.abs(pixels(x) - pixels(y)).max() <= 1


def test_requests_the_model_cannot_serve_name_the_field(zoo_pipeline, sd_pipeline):
    cases = [(zoo_pipeline, Request(prompt="a cat"), "prompt"),
             (zoo_pipeline, Request(height=32), "height"),
             (sd_pipeline, Request(), "prompt"),
             (sd_pipeline, Request(prompt="x", width=36), "width"),
             (sd_pipeline, Request(prompt="x", scheduler="pndm"), "scheduler"),
             (sd_pipeline, Request(prompt="x", steps=0), "steps"),
             (sd_pipeline, Request(prompt="x", seed=-1), "seed")]
    for pipe, request, field in cases:
        with pytest.raises(RequestError) as e:
            pipe.prepare(request)
        assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    with pytest.raises(ValueError, match="differ"):
        sd_pipeline.run_batch([sd_pipeline.prepare(Request(prompt="x", steps=2)),
                               sd_pipeline.prepare(Request(prompt="x", steps=3))])


def test_every_loaded_file_is_checked_against_the_manifest(zoo_serve_artifact, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(zoo_serve_artifact, copy, ignore=shutil.ignore_patterns("stages"))
    onnx = copy / "onnx" / "unet" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    with pytest.raises(InputError, match="onnx/unet/model.onnx: sha256 differs"):
        Pipeline.from_artifact(copy)
    # torch reads model/, not onnx/: the tampered graph is never loaded, so it does not block torch
    assert Pipeline.from_artifact(copy, backend="torch-cpu")(steps=1, seed=0)[0].size == (16, 16)
    assert Pipeline.from_artifact(copy, verify=False).backend == "onnxruntime-cpu"

    (copy / "model" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="model/extra.safetensors: not in the manifest"):
        Pipeline.from_artifact(copy, backend="torch-cpu")
    (copy / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a deploykit artifact"):
        Pipeline.from_artifact(copy)
    with pytest.raises(InputError, match="no such artifact folder"):
        Pipeline.from_artifact(tmp_path / "nothing")


def test_sd_on_torch_needs_a_sound_stage_cache(sd_serve_artifact, tmp_path):
    copy = tmp_path / "sd"
    shutil.copytree(sd_serve_artifact, copy)
    teacher = next((copy / "stages").glob("00-teacher-*"))
    config = teacher / "pipeline" / "vae" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": 1.0'))
    with pytest.raises(InputError, match="pipeline/vae/config.json: sha256 differs"):
        Pipeline.from_artifact(copy, backend="torch-cpu")
    assert Pipeline.from_artifact(copy).backend == "onnxruntime-cpu"  # onnx/ is self-contained


def test_backend_order_and_overrides():
    both, torch_only = ArtifactParts(onnx=True, engines=False), ArtifactParts(onnx=False, engines=False)
    assert choose_backend(both) == "onnxruntime-cpu"  # this machine has no CUDA and no TensorRT
    assert choose_backend(torch_only) == "torch-cpu"
    assert choose_backend(both, "torch-cpu") == "torch-cpu"
    assert "no TensorRT engines" in unavailable_reason("tensorrt", both)
    with pytest.raises(InputError, match="backend onnxruntime-cpu cannot run here: the artifact has no ONNX export"):
        choose_backend(torch_only, "onnxruntime-cpu")
    with pytest.raises(InputError, match="torch-cuda cannot run here: torch sees no CUDA device"):
        choose_backend(both, "torch-cuda")
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        choose_backend(both, "tpu")


def test_the_runtime_runs_an_artifact_without_training_code(zoo_serve_artifact, sd_serve_artifact):
    script = f"""
import json, sys
from deploykit.runtime import Pipeline
for path, prompt, backend in [({str(zoo_serve_artifact)!r}, None, 'torch-cpu'), ({str(zoo_serve_artifact)!r}, None, None),
                              ({str(sd_serve_artifact)!r}, 'x', None), ({str(sd_serve_artifact)!r}, 'x', 'torch-cpu')]:
    Pipeline.from_artifact(path, backend=backend)(prompt, steps=1, seed=0)
print(json.dumps(sorted(sys.modules)))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    training = ("deploykit.prune", "deploykit.distill", "deploykit.quantize", "deploykit.sparsity", "deploykit.stages",
                "deploykit.runner", "deploykit.recipe", "deploykit.export", "torch_pruning")
    assert [m for m in modules if m.startswith(training)] == []
