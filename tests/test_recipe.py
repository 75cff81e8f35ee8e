import json

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
