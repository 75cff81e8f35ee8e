"""The one description of a model's inputs and outputs (deploykit.models.io_spec) against the models and graphs it describes."""

from __future__ import annotations

import pytest
import torch

from deploykit.models.io_spec import (
    CLIPTextIO,
    SDUNetIO,
    SDXLUNetIO,
    VAEDecoderIO,
    pipeline_component_io,
    unet_io,
    vae_scale_factor,
)
from deploykit.models.topologies import build_pipeline, topology
from deploykit.models.wrappers import TensorOutput


@pytest.fixture(scope="module")
def sdxl():
    return build_pipeline("tiny-sdxl", seed=0)


def test_the_unet_takes_what_its_description_says(sdxl):
    unet = sdxl.unet.eval()
    io = unet_io(unet)
    assert isinstance(io, SDXLUNetIO)
    assert io.input_names() == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    inputs = io.sample_input(2, 8, image_side=16)
    for spec, x in zip(io.inputs(), inputs):
        assert x.shape == io.input_profile((1, 2, 2), (8, 8, 8))[spec.name][1], spec.name
    assert inputs[4][0].tolist() == [16, 16, 0, 0, 16, 16] == SDXLUNetIO.time_ids(16, 16)
    with torch.no_grad():
        out = TensorOutput(unet)(*inputs)
    assert out.shape == io.outputs()[0].shape({"batch": 2, "height": 8, "width": 8})
    assert io.dynamic_axes()["time_ids"] == {0: "batch"} and io.fp32_inputs == ("timestep", "time_ids")
    assert io.constants(1024) == {"time_ids": [1024, 1024, 0, 0, 1024, 1024]}


def test_a_diffusers_call_is_named_as_described(sdxl):
    """What calibration records and the runtime's ONNX UNet feeds: a pipeline's UNet call, by the description's names."""
    io = unet_io(sdxl.unet)
    x, hidden, pooled, ids = torch.zeros(2, 4, 8, 8), torch.ones(2, 77, 64), torch.ones(2, 32), torch.ones(2, 6)
    named = io.named_inputs((x, torch.tensor(7)), {"encoder_hidden_states": hidden,
                                                   "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}})
    assert list(named) == list(io.input_names())
    assert named["timestep"].tolist() == [7, 7]  # one per row, as the pipeline's scalar meant
    assert named["text_embeds"] is pooled and named["encoder_hidden_states"] is hidden
    pixel = unet_io({"in_channels": 1, "out_channels": 1, "sample_size": 16})
    assert list(pixel.named_inputs((x, torch.tensor([1, 2])), {})) == ["sample", "timestep"]


def test_pipeline_components_and_their_profiles(sdxl):
    text = pipeline_component_io("text_encoder_2", sdxl.text_encoder_2.config, sdxl=True)
    assert isinstance(text, CLIPTextIO) and text.output_names()[:2] == ("text_embeds", "last_hidden_state")
    assert text.output_names()[-1] == f"hidden_states.{sdxl.text_encoder_2.config.num_hidden_layers}"
    assert text.input_profile((1, 2, 4), (8, 8, 8)) == {"input_ids": ((1, 77), (2, 77), (4, 77))}
    sd_text = pipeline_component_io("text_encoder", sdxl.text_encoder.config, sdxl=False)
    assert sd_text.output_names() == ("last_hidden_state", "pooler_output")

    vae = pipeline_component_io("vae_decoder", sdxl.vae.config, sdxl=True)
    assert isinstance(vae, VAEDecoderIO) and vae.scale_factor == vae_scale_factor(sdxl.vae.config) == sdxl.vae_scale_factor
    assert vae.scaling_factor == sdxl.vae.config.scaling_factor
    # one image per classifier-free guidance pair of UNet rows
    assert vae.input_profile((1, 2, 8), (8, 16, 16))["latent_sample"] == ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 16, 16))
    assert vae.dynamic_axes()["sample"] == {0: "batch", 2: "height", 3: "width"}

    unet = pipeline_component_io("unet", sdxl.unet.config, sdxl=True)
    assert unet.scalar_timestep and unet.export_inputs(unet.sample_input(2, 8))[1].shape == ()  # optimum's layout


def test_a_graph_that_is_not_the_description_is_refused():
    from deploykit.errors import DeployKitError

    io = SDUNetIO(topology("tiny-sd")["unet"], scalar_timestep=True)
    io.check_graph({"sample": ["batch", 4, "height", "width"], "timestep": [],
                    "encoder_hidden_states": ["batch", "sequence", 32]}, "model.onnx")
    with pytest.raises(DeployKitError, match="model.onnx: the graph's inputs"):
        io.check_graph({"sample": ["batch", 4, "height", "width"], "timestep": ["batch"],
                        "encoder_hidden_states": ["batch", "sequence", 32]}, "model.onnx")
