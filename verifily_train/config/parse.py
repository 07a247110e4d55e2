"""Reading train.yaml and ``key=value`` overrides into plain nested dicts, refusing hostile YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from verifily_train.errors import ConfigError
from verifily_train.jsonsafe import lone_surrogate

OVERRIDES = "command line"


# Values (scalars and collections) a YAML document may hold once its aliases are expanded: a train.yaml has a
# few hundred; a 640-byte alias bomb expands to millions and would be built in full by OmegaConf.
MAX_YAML_VALUES = 10_000


class YamlTooLarge(ValueError):
    """The document's aliases expand past ``MAX_YAML_VALUES`` values (or refer to themselves)."""


def _expanded_size(root) -> int:
    """How many values the node graph holds with every alias expanded, counted without expanding it."""
    sizes: Dict[int, Optional[int]] = {}

    def size(node) -> int:
        known = sizes.get(id(node), -1)
        if known is None:
            raise YamlTooLarge("an alias refers to itself")
        if known >= 0:
            return known
        sizes[id(node)] = None  # in progress: meeting it again means a cycle
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        if total > MAX_YAML_VALUES:
            raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        sizes[id(node)] = total
        return total

    return size(root)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load``, but a document whose aliases expand past ``MAX_YAML_VALUES`` values is refused
    (``YamlTooLarge``) before any of it is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Dict[str, Any]:
    """Parse a YAML mapping, turning syntax errors into one line that names file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, None, f"cannot read: {err}") from err
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(path, line, f"YAML syntax error: {problem}") from err
    except YamlTooLarge as err:
        raise ConfigError(path, None, f"refused: {err} (YAML anchors and aliases are limited)") from None
    except RecursionError:
        raise ConfigError(path, None, "YAML nested too deeply") from None
    except ValueError as err:  # a number too long for Python's int parser
        raise ConfigError(path, None, f"bad value: {str(err).split(';')[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"must be a YAML mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """``training.num_epochs=1 lora.r=8`` into a nested dict; values are parsed as YAML scalars."""
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(OVERRIDES, item, "an override must look like key=value, e.g. training.num_epochs=1")
        key, raw = item.split("=", 1)
        try:
            value = safe_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except YamlTooLarge as err:
            raise ConfigError(OVERRIDES, key, f"refused: {err} (YAML anchors and aliases are limited)") from None
        except RecursionError:
            raise ConfigError(OVERRIDES, key, "value nested too deeply") from None
        except ValueError as err:  # a number too long for Python's int parser
            raise ConfigError(OVERRIDES, key, f"bad value: {str(err).split(';')[0]}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(OVERRIDES, key, "conflicts with an earlier override of its parent key")
        node[parts[-1]] = value
    return nested


def check_text(values: Dict[str, Any], where: str) -> None:
    """No string holds a lone surrogate: a YAML ``"\\ud800"`` escape, or bytes of an argument that are not UTF-8
    (Python passes them on as surrogates); printing or hashing the config would fail on it later."""
    key = lone_surrogate(values)
    if key is not None:
        raise ConfigError(where, key or None, "not valid Unicode text (a lone surrogate, or bytes that are not UTF-8)")
