"""The model-family registry: which families exist, and model names -> configs.

A model name is `family:config`, e.g. `gpt2:d12` or `gpt2:l4h4c256t128`; a bare GPT-2 config (`d12`,
`l4h4c256`) still means GPT-2. Each family lives in its own module, which defines `FAMILY` (models/base.py's
`Family`: its config class, model class, parameter spec and config-name parser); the module is imported on first
use. Adding a family is one line here plus its files.
"""
from __future__ import annotations

import importlib

from .errors import UserError

FAMILIES: dict[str, str] = {  # name prefix -> module (a family may answer to several prefixes, one per version)
    "gpt2": "llmpy.models.gpt2",
    "llama3": "llmpy.models.llama3", "llama3.1": "llmpy.models.llama3", "llama3.2": "llmpy.models.llama3",
    "mmfree": "llmpy.models.mmfree",
}
DEFAULT_FAMILY = "gpt2"  # what a name without "family:" means (the GPT-2 shorthands predate the families)


def register_family(name: str, module: str) -> None:
    """Makes the family defined by `module` (which has a FAMILY) known as `name` (tests add families this way)."""
    FAMILIES[name] = module


def get_family(name: str):
    """The Family registered as `name`; UserError for an unknown one."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return importlib.import_module(FAMILIES[name]).FAMILY


def family_of(cfg):
    """The Family of a config (each config class names its family)."""
    return get_family(type(cfg).family)


def config_from_name(name: str):
    """`family:config` (or a bare GPT-2 config) -> that family's config."""
    fam, sep, rest = name.strip().partition(":")
    if not sep:
        fam, rest = DEFAULT_FAMILY, name
    family = get_family(fam.strip().lower())
    return family.parse(fam.strip().lower(), rest.strip())


def config_from_dict(family: str, d: dict):
    """A config from its family's name and its to_dict() (checkpoint metadata)."""
    return get_family(family).config.from_dict(d)
