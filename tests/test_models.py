import json

import pytest
import torch

from deploykit.errors import InputError
from deploykit.models import count_macs, describe, load_model, save_model
from deploykit.prune import PruneConfig, prune_to_macs


def _inputs(batch=2):
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700][:batch])


def test_pruned_model_round_trips_through_safetensors_without_pickle(tiny_unet, tmp_path):
    pruned, _ = prune_to_macs(tiny_unet, _inputs(1), PruneConfig(macs_target=0.5, round_to=4))
    save_model(pruned, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["architecture.json", "model.safetensors"]
    arch = json.loads((tmp_path / "architecture.json").read_text())
    assert arch["class"] == "UNet2DModel"
    assert arch["layers"]["down_blocks.1.resnets.0.conv1"]["out_channels"] < 32

    rebuilt = load_model(tmp_path)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t).sample, pruned(x, t).sample, rtol=0, atol=0)
    assert describe(rebuilt) == describe(pruned)
    assert count_macs(rebuilt, _inputs(1)) == count_macs(pruned, _inputs(1))


def test_weights_that_do_not_fit_the_architecture_are_refused(tiny_unet, tmp_path):
    pruned, _ = prune_to_macs(tiny_unet, _inputs(1), PruneConfig(macs_target=0.5, round_to=4))
    save_model(pruned, tmp_path / "pruned")
    save_model(tiny_unet, tmp_path / "dense")
    (tmp_path / "dense" / "architecture.json").write_bytes((tmp_path / "pruned" / "architecture.json").read_bytes())
    with pytest.raises(InputError, match="do not fit"):
        load_model(tmp_path / "dense")


def test_missing_files_are_an_input_error(tmp_path):
    with pytest.raises(InputError, match="missing"):
        load_model(tmp_path)
