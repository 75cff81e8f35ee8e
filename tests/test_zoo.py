import json

import torch

from deploykit.models import load_teacher
from deploykit.stages.data import feature_extractor
from deploykit.zoo import get_entry
from deploykit.zoo.data import load_digits_images


def test_shipped_digits_teacher_loads_and_is_small():
    entry = get_entry("digits")
    card = json.loads((entry.folder / "card.json").read_text())
    assert card["settings"]["teacher"]["steps"] == entry.teacher.steps, "the card records the settings it was trained with"
    assert (entry.folder / "unet.safetensors").stat().st_size < 8_000_000
    teacher = load_teacher("zoo:digits")
    assert teacher.sample_shape == (1, 16, 16) and teacher.dataset == "sklearn-digits"
    out = teacher.model(torch.randn(2, 1, 16, 16), torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_shipped_feature_extractor_recognises_the_digits():
    entry = get_entry("digits")
    card = json.loads((entry.folder / "card.json").read_text())
    assert card["classifier_held_out_accuracy"] > 0.95
    from deploykit.eval.features import DigitsClassifier
    from deploykit.io import load_tensors

    model = DigitsClassifier()
    model.load_state_dict(load_tensors(entry.folder / "features.safetensors"))
    images, labels = load_digits_images(16)
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95


def test_the_shipped_teacher_denoises_real_digits():
    """A trained teacher predicts the added noise far better than chance (loss well under 1)."""
    from diffusers import DDPMScheduler

    teacher = load_teacher("zoo:digits").model
    images, _ = load_digits_images(16)
    gen = torch.Generator().manual_seed(0)
    x0 = images[:128]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 1000, (128,), generator=gen)
    with torch.no_grad():
        pred = teacher(DDPMScheduler().add_noise(x0, noise, t), t).sample
    assert torch.nn.functional.mse_loss(pred, noise).item() < 0.15


def test_zoo_train_writes_card_weights_and_features(zoo_dir, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_ZOO_DIR", str(zoo_dir))
    folder = zoo_dir / "digits-tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "features.safetensors", "unet.safetensors",
                                                       "unet_config.json"]
    assert list(load_teacher("zoo:digits-tiny").model.config.block_out_channels) == [16, 32, 32]
    assert json.loads((folder / "card.json").read_text())["settings"]["teacher"]["steps"] == get_entry("digits-tiny").teacher.steps
    assert feature_extractor(folder) is not None
