"""Every file in configs/ loads, names a registered model and dataset, sets exactly its model's
fields, and documents how to run it."""

import importlib
import os

import pytest

from medjax import datasets
from medjax import models

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_NAMES = sorted(
    name[:-3] for name in os.listdir(CONFIG_DIR) if name.endswith(".py") and name != "__init__.py"
)


def test_there_are_configs():
    assert {"base", "best", "paper", "fast", "quick"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_and_documents_its_run_command(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    assert config.model.name in models.MODELS, f"configs/{name}.py: unknown model {config.model.name!r}"
    models.create_model(config.model, 2)  # Fields of another model are errors.
    # Every field of the model is written out: the command line can set each, checkpoints record them all.
    assert set(config.model) == {"name", *models.config_fields(config.model.name)}, f"configs/{name}.py"
    assert config.data.name in datasets.registry.BUILDERS, f"configs/{name}.py: unknown dataset"
    assert config.train.batch_size > 0 and config.train.num_epochs > 0
    doc = module.__doc__ or ""
    assert f"configs/{name}.py" in doc, f"configs/{name}.py: its docstring must carry its run command"


def test_a_field_of_another_model_is_a_clear_error():
    config = importlib.import_module("configs.resnet18").get_config()
    config.model.dropout_rate = 0.1  # ResNets have no dropout.
    with pytest.raises(ValueError, match="Unknown config.model field.* dropout_rate for model 'resnet18'"):
        models.create_model(config.model, 2)
