import numpy as np
import onnx
import torch

from deploykit.export import compare_with_torch, export_unet
from deploykit.runtime import OnnxRuntimeBackend, TorchBackend


def _check_inputs(batch=3):
    rng = np.random.default_rng(0)
    return [{"sample": rng.standard_normal((batch, 1, 16, 16)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (batch,)).astype(np.int64)}]


def test_export_matches_torch_with_a_dynamic_batch(tiny_unet, tmp_path):
    path = export_unet(tiny_unet, tmp_path / "unet" / "model.onnx", (torch.randn(2, 1, 16, 16), torch.tensor([1, 2])))
    assert path.is_file() and not list(path.parent.glob(".*"))
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["sample", "timestep"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    result = compare_with_torch(tiny_unet, path, _check_inputs(batch=5), atol=1e-4, rtol=1e-3)
    assert result["passed"] and result["max_abs_error"] < 1e-4

    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 999])
    torch.testing.assert_close(OnnxRuntimeBackend(path)(x, t), TorchBackend(tiny_unet)(x, t), atol=1e-4, rtol=1e-3)


def test_the_check_catches_a_model_that_differs(tiny_unet, tmp_path):
    path = export_unet(tiny_unet, tmp_path / "model.onnx", (torch.randn(1, 1, 16, 16), torch.tensor([1])))
    with torch.no_grad():
        tiny_unet.conv_out.weight.add_(0.5)
    result = compare_with_torch(tiny_unet, path, _check_inputs(), atol=1e-4, rtol=1e-3)
    assert not result["passed"] and result["max_abs_error"] > 1e-2
