"""Every recipe shipped in recipes/ validates (keys, types, step arguments, contradictions), so none of the
commands in the docs fails on its recipe before it starts."""
from pathlib import Path

import pytest

from lowbit.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_recipes_are_found():
    assert len(RECIPES) >= 20


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
