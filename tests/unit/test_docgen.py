"""The configuration reference is generated from the models and cannot drift from them."""

from __future__ import annotations

from pathlib import Path

from bridge import config as cfg
from bridge import docgen, registry

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_matches_the_models() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == docgen.render(), (
        "docs/configuration.md is out of date: run `make docs` and commit it"
    )


def test_every_core_key_is_in_the_reference() -> None:
    text = docgen.render()
    for model in (cfg.DaemonConfig, cfg.ApiConfig, cfg.ApiToken, cfg.AsyncConfig):
        for name, f in model.model_fields.items():
            assert f"| `{f.alias or name}` |" in text, name
            assert f.description, f"{model.__name__}.{name} has no description"


def test_defaults_are_shown_in_config_units() -> None:
    fields = {f.name: f for f in registry.config_fields(cfg.FunctionConfig)}
    assert fields["timeout"].default == "3s"
    assert fields["memory"].default == "128MiB"
    assert fields["async"].default["max_event_age"] == "6h"
    assert docgen.format_duration(0.5) == "500ms" and docgen.format_duration(90) == "90s"
    assert '| `shutdown_grace` | duration | `"30s"` |' in docgen.render()
