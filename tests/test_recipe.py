import json
import os
import re
from pathlib import Path

import pytest

from deploykit.errors import InputError
from deploykit.recipe import load_recipe
from tests.conftest import REPO, run_cli


def test_default_recipe_is_valid():
    recipe = load_recipe(REPO / "recipes" / "digits_cpu.yaml")
    assert recipe.teacher == "zoo:digits"
    assert [s.stage for s in recipe.stages] == ["prune", "distill", "export", "bench", "eval"]
    assert recipe.stage("prune").macs_target <= 0.5


@pytest.mark.parametrize(
    "body, expected",
    [
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: prune\n    criterion: magnitud\n",
         "stages[0].criterion: Input should be 'block-removal', 'cap', 'diff-pruning', 'magnitude', 'nici', 'random' or 'taylor'"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: prune\n    colour: red\n", "stages[0].colour: unknown key"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: prune\n    macs_target: 1.5\n", "stages[0].macs_target"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: prune\n  - stage: bench\n    runs: many\n",
         "stages[1].runs: Input should be a valid integer"),
        ("name: x\nteacher: zoo:digits\nbogus: 1\nstages:\n  - stage: prune\n", "bogus: unknown key"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: bench\n  - stage: prune\n", "stages must run in the order"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: eval\n", "add a prune or sparsify stage"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: distill\n    denoise_weight: 0\n    output_kd_weight: 0\n",
         "nothing to train on"),
        ("name: x\nteacher: zoo:digits\nstages:\n  - stage: sharpen\n", "stages[0]"),
        ("- just\n- a list\n", "a recipe is a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_key_and_the_file(tmp_path, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_schema_command_prints_the_json_schema():
    result = run_cli("recipe", "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Recipe"
    assert {"name", "teacher", "stages"} <= set(schema["properties"])
    assert "PruneStage" in json.dumps(schema)


def test_check_command(tmp_path):
    assert run_cli("recipe", "check", str(REPO / "recipes" / "digits_cpu.yaml")).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nteacher: zoo:digits\nstages: []\n")
    result = run_cli("recipe", "check", str(bad))
    assert result.returncode == 2
    assert "stages" in result.stderr and "Traceback" not in result.stderr


def test_the_recipe_offers_every_registered_criterion():
    from typing import get_args

    from deploykit.prune import available
    from deploykit.stages.prune import PruneStage

    assert set(get_args(PruneStage.model_fields["criterion"].annotation)) == set(available())


# -- every number has a bound a machine can meet -----------------------------------------------------------------------


def _numbers(node, path=()):
    """(path, schema) of every integer / number in a JSON schema."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            yield path, node
        for key, value in node.items():
            yield from _numbers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, (*path, i))


def test_every_number_in_a_recipe_has_an_upper_bound():
    from deploykit.recipe import json_schema

    numbers = list(_numbers(json_schema()))
    assert len(numbers) > 60  # every stage's settings, and the profile tuples' items
    unbounded = [".".join(map(str, p)) for p, n in numbers if "maximum" not in n and "exclusiveMaximum" not in n]
    assert unbounded == []


def test_every_tolerance_is_at_most_one():
    from deploykit.recipe import json_schema

    tolerances = [(p, n) for p, n in _numbers(json_schema()) if str(p[-1]).endswith(("atol", "rtol"))]
    assert len(tolerances) == 8 and all(n["maximum"] == 1 for _, n in tolerances)


def _refusal(tmp_path: Path, raw: bytes) -> str:
    """The message loading a recipe of these bytes fails with."""
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    return str(err.value)


def _body(top: str = "", stage: str = "    round_to: 4\n", more: str = "") -> str:
    return f"name: x\nteacher: zoo:digits\n{top}stages:\n  - stage: prune\n{stage}{more}"


@pytest.mark.parametrize("body, expected", [
    (_body("seed: 4294967296\n"), "seed: Input should be less than or equal to 4294967295"),
    (_body("seed: 18446744073709551616\n"), "seed: Input should be less than or equal to 4294967295"),
    (_body(more="  - stage: export\n    atol: .inf\n"), "stages[1].atol: Input should be a finite number"),
    (_body(more="  - stage: export\n    rtol: 2\n"), "stages[1].rtol: Input should be less than or equal to 1"),
    (_body(more="  - stage: distill\n    denoise_weight: .nan\n"), "stages[1].denoise_weight: Input should be a finite number"),
    (_body(more="  - stage: distill\n    checkpoint_every: 100000000\n"), "stages[1].checkpoint_every"),
    (_body(more="  - stage: distill\n    warmup_steps: 100000000\n"), "stages[1].warmup_steps"),
    (_body(more="  - stage: export\n  - stage: bench\n    warmup: 1000000\n"), "stages[2].warmup"),
    (_body(more="  - stage: export\n  - stage: quantize\n    max_quality_loss: {fid: 1.0e+9}\n  - stage: eval\n"),
     "stages[2].max_quality_loss.fid"),
    (_body(more="  - stage: export\n  - stage: verify\n    int8_atol: 10\n"), "stages[2].int8_atol"),
])
def test_numbers_out_of_range_are_refused(tmp_path, body, expected):
    assert expected in _refusal(tmp_path, body.encode())


def test_profile_shapes_are_bounded(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nteacher: random:tiny-sd\ntarget: jetson-orin-nano\nstages:\n  - stage: prune\n"
                    "  - stage: export\n  - stage: bundle\n    batch: [1, 2, 100000]\n    resolution: [64, 64, 65536]\n")
    with pytest.raises(InputError) as err:
        load_recipe(path)
    assert "stages[2].batch[2]: Input should be less than or equal to 4096" in str(err.value)
    assert "stages[2].resolution[2]: Input should be less than or equal to 4096" in str(err.value)


def test_the_largest_seed_stays_in_range_through_the_stages_arithmetic():
    import torch

    from deploykit.distill.trainer import step_generator
    from deploykit.stages.bounds import SEED_MAX, TRAINING_STEPS_MAX
    from deploykit.stages.quantize import CALIBRATION_SEED_OFFSET

    step_generator(SEED_MAX, TRAINING_STEPS_MAX)  # distill: seed * 1_000_003 + step
    torch.Generator().manual_seed(SEED_MAX + CALIBRATION_SEED_OFFSET + 1_000_000)  # quantize, eval: seed + index
    torch.manual_seed(SEED_MAX + 1)  # the random-weights topology: seed + 1


# -- hostile YAML --------------------------------------------------------------------------------------------------------

GOOD = _body().encode()
# a billion laughs: each anchor a list of eight aliases of the one before, 8**9 "lol"s expanded
_LAUGHS = b"".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 8)}]\n".encode() for i in range(1, 10))


@pytest.mark.parametrize("raw, expected", [
    (GOOD.replace(b"name: x\n", b"name: x\nname: y\n"), "found duplicate key 'name'"),
    (GOOD + b"    round_to: 8\n", "found duplicate key 'round_to'"),
    (b"l0: &l0 lol\n" + _LAUGHS + GOOD, "expands to more than"),
    (b"p: &p " + b"x" * 200_000 + b"\n" + GOOD.replace(b"    round_to: 4\n", b"    ignored: [" + b"*p, " * 100 + b"*p]\n"),
     "expands to more than"),
    (GOOD.replace(b"round_to: 4", b"ignored: " + b"[" * 5000 + b"]" * 5000), "nested deeper than 32 levels"),
    (GOOD.replace(b"round_to: 4", b"ignored: " + b"[" * 40 + b"]" * 40), "nested deeper than 32 levels"),
    (GOOD.replace(b"name: x\n", b"name: x\nseed: " + b"9" * 5000 + b"\n"), "Exceeds the limit (4300 digits)"),
    (GOOD.replace(b"name: x\n", b"name: x\nseed: 2024-13-45\n"), "month must be in 1..12"),
    (GOOD.replace(b"zoo:digits", b"zoo:digits\xff"), "is not UTF-8 text (byte 27: b'\\xff')"),
    (GOOD.decode().encode("utf-16"), "is UTF-16 (or UTF-32) text: save it as UTF-8"),
    (GOOD + b"#" * (1 << 20), "is larger than 1 MiB"),
    (GOOD.replace(b"name: x\n", b"name: x\n1: 2\n"), "r.yaml: 1: Keys should be strings"),
    (GOOD.replace(b"name: x\n", b"name: x\n\"[/x]\": 2\n"), "r.yaml: '[/x]': unknown key"),
    (GOOD.replace(b"stages:\n", b"stages: &s\n").replace(b"    round_to: 4\n", b"    ignored: *s\n"),
     "nested deeper than 32 levels"),  # a list that holds itself
])
def test_hostile_yaml_is_one_clear_error(tmp_path, raw, expected):
    assert expected in _refusal(tmp_path, raw)


def test_a_utf8_bom_anchors_aliases_and_merge_keys_are_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: x\nteacher: zoo:digits\nstages:\n  - stage: prune\n    ignored: &i [conv_in]\n"
                     b"  - stage: sparsify\n    exclude: *i\n  - <<: {stage: distill, steps: 5}\n    steps: 7\n")
    recipe = load_recipe(path)
    assert recipe.name == "x" and recipe.stage("sparsify").exclude == ["conv_in"]
    assert recipe.stage("distill").steps == 7  # a merged key the mapping overrides is not a duplicate


def test_too_many_errors_are_counted_not_listed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nteacher: zoo:digits\n" + "".join(f"bogus{i}: 1\n" for i in range(100))
                    + "stages:\n  - stage: prune\n")
    with pytest.raises(InputError) as err:
        load_recipe(path)
    assert str(err.value).count("unknown key") == 20 and "... and 80 more" in str(err.value)


@pytest.mark.parametrize("kind", ["fifo", "folder", "absent"])
def test_a_recipe_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    import os

    path = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(InputError, match="recipe not found" if kind == "absent" else "is not a regular file"):
        load_recipe(path)


def test_the_cli_prints_markup_in_messages_as_text(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(_body("\"[/x]\": 1\n\"[bold]b\": 2\n"))
    result = run_cli("recipe", "check", str(path))
    assert result.returncode == 2, result.stderr
    assert "'[/x]': unknown key" in result.stderr and "'[bold]b': unknown key" in result.stderr
    assert "Traceback" not in result.stderr


# -- prompt files: inside the recipe's folder, regular, capped --------------------------------------------------------


def _sd_recipe(folder: Path, prompts: str) -> Path:
    path = folder / "sd.yaml"
    path.write_text(f"name: x\nteacher: random:tiny-sd\nresolution: 32\nstages:\n  - stage: prune\n    round_to: 4\n"
                    f"  - stage: distill\n    steps: 2\n    prompts: {json.dumps(prompts)}\n")
    return path


@pytest.fixture
def folders(tmp_path):
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir()
    elsewhere.mkdir()
    (recipes / "prompts.txt").write_text("a cat\n")
    (elsewhere / "prompts.txt").write_text("a dog\n")
    return recipes, elsewhere


def test_a_prompt_file_in_the_recipes_folder_is_read(folders):
    recipes, _ = folders
    (recipes / "sub").mkdir()
    (recipes / "sub" / "more.txt").write_text("a bird\n")
    assert load_recipe(_sd_recipe(recipes, "prompts.txt")).stage("distill").prompts == "prompts.txt"
    load_recipe(_sd_recipe(recipes, "sub/more.txt"))


@pytest.mark.parametrize("value, reason", [
    ("../elsewhere/prompts.txt", "goes up out of the folder"),
    ("{elsewhere}/prompts.txt", "is an absolute path"),
    ("link.txt", "leads out of the folder through a symlink"),
    ("linked/prompts.txt", "leads out of the folder through a symlink"),
])
def test_a_prompt_file_outside_the_recipes_folder_is_refused_unless_allowed(folders, value, reason):
    recipes, elsewhere = folders
    (recipes / "link.txt").symlink_to(elsewhere / "prompts.txt")
    (recipes / "linked").symlink_to(elsewhere)
    recipe = _sd_recipe(recipes, value.format(elsewhere=elsewhere))
    with pytest.raises(InputError) as err:
        load_recipe(recipe)
    assert f"{recipe}: stages[1].prompts:" in str(err.value) and reason in str(err.value)
    assert "--allow-path" in str(err.value)
    # a folder the user names on the command line may hold it
    assert load_recipe(recipe, [elsewhere]).stage("distill").prompts == value.format(elsewhere=elsewhere)
    with pytest.raises(InputError):
        load_recipe(recipe, [recipes / "sub"])


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "file not found"),
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: p.mkdir(), "is not a regular file"),
    (lambda p: p.write_bytes(b"a cat\n\xff\n"), "is not UTF-8 text"),
    (lambda p: p.write_text(" \n\n\t\n"), "has no text"),
    (lambda p: p.write_bytes(b"a cat\n" * ((16 << 20) // 6 + 1)), "is larger than 16 MiB"),
])
def test_recipe_check_validates_the_prompt_file(folders, make, expected):
    recipes, _ = folders
    make(recipes / "p.txt")
    recipe = _sd_recipe(recipes, "p.txt")
    with pytest.raises(InputError, match=expected):
        load_recipe(recipe)
    result = run_cli("recipe", "check", str(recipe))
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_allow_path_on_the_command_line(folders):
    recipes, elsewhere = folders
    recipe = _sd_recipe(recipes, str(elsewhere / "prompts.txt"))
    refused = run_cli("recipe", "check", str(recipe))
    assert refused.returncode == 2 and "is an absolute path" in refused.stderr
    assert run_cli("recipe", "check", str(recipe), "--allow-path", str(elsewhere)).returncode == 0
    out = recipes / "out"
    result = run_cli("build", str(recipe), "--out", str(out), "--allow-path", str(elsewhere), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "teacher -> prune -> distill" in result.stderr and not out.exists()


# -- products of settings against this machine's memory -------------------------------------------------------------


def test_a_product_of_settings_that_cannot_fit_stops_the_build_before_it_writes(tmp_path):
    recipe = tmp_path / "huge.yaml"
    # each setting within its own range; together 1,000,000 images of 4096 x 4096 for two models: 400 TB
    recipe.write_text("name: huge\nteacher: random:tiny-sd\nresolution: 4096\nstages:\n  - stage: prune\n"
                      "  - stage: eval\n    num_samples: 1000000\n")
    load_recipe(recipe)
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        result = run_cli("build", str(recipe), "--out", str(out), *extra)
        assert result.returncode == 2, result.stderr
        assert "eval.num_samples x resolution: the eval stage would hold at least" in result.stderr
        assert "of memory; lower eval.num_samples" in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()


@pytest.mark.parametrize("recipe_text, fields", [
    ("teacher: random:sd15\nresolution: 1024\nstages:\n  - stage: prune\n  - stage: export\n  - stage: bench\n"
     "    batch_size: 64\n", "bench.batch_size x resolution"),
    ("teacher: random:sd15\nresolution: 512\nstages:\n  - stage: prune\n  - stage: export\n  - stage: quantize\n"
     "    calibration_samples: 100000\n    calibration_steps: 1000\n",
     "quantize.calibration_samples x quantize.calibration_steps x resolution"),
    ("teacher: random:sd15\nresolution: 2048\nstages:\n  - stage: prune\n  - stage: distill\n    prompts: p.txt\n"
     "    batch_size: 4096\n", "distill.batch_size / distill.gradient_accumulation x resolution"),
    ("teacher: random:sd15\nresolution: 512\nstages:\n  - stage: prune\n  - stage: distill\n    prompts: p.txt\n"
     "    teacher_samples: 1000000\n", "distill.teacher_samples x resolution"),
    ("teacher: random:sd15\nresolution: 512\nstages:\n  - stage: prune\n  - stage: export\n    check_batch: 256\n",
     "export.check_batch x resolution"),
])
def test_each_stage_names_the_product_over_budget(tmp_path, recipe_text, fields):
    from deploykit.stages.base import Preflight
    from deploykit.stages.footprint import check_memory

    (tmp_path / "p.txt").write_text("a cat\n")
    path = tmp_path / "r.yaml"
    path.write_text("name: x\n" + recipe_text)
    recipe = load_recipe(path)
    pf = Preflight(recipe, path)
    with pytest.raises(InputError, match=f"{re.escape(fields)}: the .* stage would hold at least"):
        check_memory(recipe.plan(), pf.footprint, pf.where, budget=64 << 30)


@pytest.mark.parametrize("name", ["sd15_cpu", "sd15_gpu", "sd15_dakd_gpu", "sd15_int8_cpu", "sd15_jetson",
                                  "sd15_jetson_nano", "sdxl_cpu", "digits_cpu", "digits_int8_cpu", "digits_sparse_cpu"])
def test_the_shipped_recipes_fit_a_16_gb_machine(name):
    from deploykit.stages.base import Preflight
    from deploykit.stages.footprint import check_memory

    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)
    estimates = check_memory(recipe.plan(), Preflight(recipe, path).footprint, "", budget=16 << 30)
    assert estimates and max(estimates.values()) < 8 << 30


@pytest.mark.parametrize("teacher, side", [("zoo:digits", 16), ("random:tiny-sd", 128), ("random:tiny-sd", 256)])
def test_the_training_estimate_is_what_torch_keeps_for_the_backward_pass_or_a_little_less(tmp_path, teacher, side):
    """A floor within 20%: the activations torch saves for backward (parameters left out), counted by its hooks."""
    import torch

    from deploykit.models.inputs import example_unet_inputs
    from deploykit.models.topologies import build_unet
    from deploykit.stages.base import Preflight
    from deploykit.zoo import get_entry

    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\nteacher: {teacher}\n" + (f"resolution: {side}\n" if "sd" in teacher else "")
                    + "stages:\n  - stage: prune\n")
    fp = Preflight(load_recipe(path), path).footprint
    if teacher == "zoo:digits":
        from diffusers import UNet2DModel

        model = UNet2DModel(**get_entry("digits").unet_config)
    else:
        model = build_unet("tiny-sd")
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            kept[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    inputs = example_unet_inputs(model.train().requires_grad_(False), 2, size=fp.sample[1])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs[0].requires_grad_(), *inputs[1:])
    assert 0.8 * sum(kept.values()) <= fp.training_step(2) <= sum(kept.values())


def test_the_attention_scores_are_counted_where_onnx_runtime_materializes_them(tmp_path):
    from deploykit.stages.base import Preflight

    path = tmp_path / "r.yaml"
    path.write_text("name: x\nteacher: random:sd15\nresolution: 512\nstages:\n  - stage: prune\n")
    fp = Preflight(load_recipe(path), path).footprint
    assert fp.sample == (4, 64, 64) and fp.text_width == 768
    # SD1.5's first level: 8 heads over 64 x 64 tokens
    assert fp.unet_call(2, materialized_attention=True) - fp.unet_call(2) == 2 * 8 * 4096**2 * 4
    assert fp.unet_call(2) == 2 * fp.unet_call(1)


def test_a_resolution_the_vae_cannot_take_is_refused_before_anything_is_written(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nteacher: random:tiny-sd\nresolution: 100\nstages:\n  - stage: prune\n    round_to: 4\n")
    out = tmp_path / "out"
    result = run_cli("build", str(recipe), "--out", str(out))
    assert result.returncode == 2 and "resolution 100 is not a multiple of 16" in result.stderr
    assert not out.exists()
