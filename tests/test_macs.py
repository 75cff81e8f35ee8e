"""MACs with attention: the same count whatever kernel runs scaled-dot-product attention.

The expected attention MACs are computed here from what each diffusers ``Attention`` module receives
(tokens, heads, head width), not from the SDPA call ``measure_macs`` counts, so a wrong formula, a
missed call or a kernel counted twice all show up as a difference.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from deploykit.models import count_macs, measure_macs
from deploykit.models.inputs import example_unet_inputs
from deploykit.models.ops import attention_macs
from deploykit.models.topologies import build_unet, unet_config
from deploykit.models.wrappers import tensor_view
from deploykit.prune import PruneConfig, prune_to_macs
from tests.conftest import TINY_UNET


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixel_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET).eval()


def _expected_attention_macs(model, inputs) -> int:
    """sum over attention calls of 2 * B * heads * Lq * Lk * d_head, read from each Attention module's inputs."""
    total, handles = [0], []

    def hook(attn, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        batch = hidden.shape[0]
        queries = hidden.shape[2] * hidden.shape[3] if hidden.dim() == 4 else hidden.shape[1]  # spatial or tokens
        keys = queries if context is None else context.shape[1]
        total[0] += 2 * batch * attn.heads * queries * keys * (attn.inner_dim // attn.heads)

    for m in model.modules():
        if isinstance(m, Attention):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            tensor_view(model)(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _cases():
    pixel = _pixel_unet()
    sd = build_unet("tiny-sd")
    sdxl = build_unet("tiny-sdxl")
    return {
        "pixel": (pixel, (torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))),
        "tiny-sd": (sd, example_unet_inputs(sd, 2, size=8)),
        "tiny-sdxl": (sdxl, example_unet_inputs(sdxl, 2, size=8)),
    }


CASES = _cases()


class _DispatchedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CASES))
def test_attention_is_total_minus_dense_layers_and_matches_the_analytic_count(name):
    model, inputs = CASES[name]
    macs = measure_macs(model, inputs)
    expected = _expected_attention_macs(model, inputs)
    assert expected > 0
    assert macs.attention == macs.total - macs.dense_layers == expected
    assert count_macs(model, inputs) == macs.total


@pytest.mark.parametrize("name", list(CASES))
def test_flash_and_math_kernels_and_the_meta_device_count_the_same(name):
    model, inputs = CASES[name]
    counts, kernels = {}, {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            counts[backend] = measure_macs(model, inputs)
            with _DispatchedOps() as ops, torch.no_grad():
                tensor_view(model)(*inputs)
            kernels[backend] = ops.names
    # the two runs really took different kernels: the fused CPU one, and the matmuls of the math path
    assert "_scaled_dot_product_flash_attention_for_cpu" in kernels[SDPBackend.FLASH_ATTENTION]
    assert "_scaled_dot_product_flash_attention_for_cpu" not in kernels[SDPBackend.MATH]
    assert counts[SDPBackend.FLASH_ATTENTION] == counts[SDPBackend.MATH]

    with torch.device("meta"):
        skeleton = type(model)(**model.config).eval()
    meta = measure_macs(skeleton, tuple(t.to("meta") for t in inputs))
    assert meta == counts[SDPBackend.MATH]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernels_count_what_the_cpu_counts(name):
    model, inputs = CASES[name]
    cpu = measure_macs(model, inputs)
    gpu_model, gpu_inputs = model.to("cuda"), tuple(t.to("cuda") for t in inputs)
    try:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            dtype = torch.float16 if backend == SDPBackend.FLASH_ATTENTION else torch.float32  # flash has no fp32
            half = gpu_model.to(dtype)
            cast = tuple(t.to(dtype) if t.is_floating_point() else t for t in gpu_inputs)
            with sdpa_kernel(backend):
                assert measure_macs(half, cast) == cpu, backend
    finally:
        model.to("cpu", torch.float32)


@pytest.mark.parametrize("q, k, v", [
    ((2, 8, 64, 40), (2, 8, 77, 40), (2, 8, 77, 40)),   # cross-attention
    ((2, 8, 64, 40), (2, 2, 64, 40), (2, 2, 64, 24)),   # grouped keys and values, a narrower value width
])
def test_the_formula_is_torchs_cuda_flash_formula(q, k, v):
    """torch counts its CUDA flash / memory-efficient kernels with this formula; ours must agree."""
    for op in (torch.ops.aten._scaled_dot_product_flash_attention, torch.ops.aten._scaled_dot_product_efficient_attention):
        tensors = [torch.empty(shape, device="meta") for shape in (q, k, v)]
        assert 2 * attention_macs(q, k, v) == flop_registry[op](*tensors)


def test_a_head_pruned_student_keeps_the_count_consistent():
    model, inputs = CASES["tiny-sd"]
    student, result = prune_to_macs(model, inputs, PruneConfig(macs_target=0.5, round_to=8, tolerance=0.2))
    macs = measure_macs(student, inputs)
    assert result.macs_after == macs.total and result.macs_dense_layers_after == macs.dense_layers
    assert result.macs_dense_layers_before == measure_macs(model, inputs).dense_layers
    assert macs.attention == _expected_attention_macs(student, inputs)
    assert result.macs_ratio <= 0.5


def test_sd15_at_512_matches_the_published_figures():
    """SD1.5's UNet at 512x512 (latent 64), batch 1: 338.7 GMACs in convolutions and linear layers
    (BK-SDM's table), 401.7 G with the attention products; counted on the meta device in about a second."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15")).eval()
    macs = measure_macs(unet, tuple(t.to("meta") for t in example_unet_inputs(unet, 1, size=64)))
    assert macs.dense_layers / 1e9 == pytest.approx(338.7, abs=0.15)
    assert macs.total / 1e9 == pytest.approx(401.7, abs=0.15)
    # every self-attention is 2 * L^2 * C, every cross-attention 2 * L * 77 * C, at (tokens, width, count) per level
    levels = [(64 * 64, 320, 5), (32 * 32, 640, 5), (16 * 16, 1280, 5), (8 * 8, 1280, 1)]
    assert macs.attention == sum(n * 2 * tokens * (tokens + 77) * width for tokens, width, n in levels)
