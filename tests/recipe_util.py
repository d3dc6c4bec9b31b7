"""The synthetic-data recipe preamble the recipe tests share (issue 24): ``recipe_toml(stages, model=..., **train)``
returns a recipe's TOML text, so each test states only what it is about; ``tiny_recipe`` (conftest) builds a
``Recipe`` object directly."""

BASE_TRAIN = {"batch_size": 32, "lr": 0.05, "train_size": 128, "test_size": 64, "threads": 1}


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def recipe_toml(stages: str, model: str = "smallcnn", **train) -> str:
    """``model`` on synthetic data with ``BASE_TRAIN`` (overridden by ``train``), then ``stages`` ([[stage]] TOML)."""
    t = {**BASE_TRAIN, **train}
    head = [f'model = "{model}"', 'dataset = "synthetic"', "[train]"] + [f"{k} = {_toml(v)}" for k, v in t.items()]
    return "\n".join(head) + "\n" + stages.strip("\n") + "\n"
