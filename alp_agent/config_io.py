"""Loading pydantic run configs from YAML with `dotted.key=value` overrides, and turning mistakes into one line.

A config may extend another with a top-level `base: other.yaml`: its mappings are merged key by key into the base's.
To replace an inherited mapping instead of merging into it, tag it `!replace`:

    base: quickstart.yaml
    env:
      id: my/Convert-v0
      kwargs: !replace {max_turns: 4}     # the quickstart's dataset, system prompt, ... are dropped, not merged

(A `dotted.key=value` override on the command line always replaces the value it names.)

Kept apart from the config models themselves so every package's config (sandbox, env, rollout, algo) can be
embedded in the run config without knowing about YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A user-caused config problem; the message is one line saying what to fix."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """'algo.sigma0=0.01' -> (['algo', 'sigma0'], 0.01). The value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key in a nested dict (creating sub-dicts); validation later rejects unknown keys."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


class Replace(dict):
    """A mapping tagged `!replace` in YAML: `deep_merge` puts it in place of the base's value, unmerged."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load plus the `!replace` tag."""


def _construct_replace(loader: yaml.SafeLoader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "!replace applies to a mapping ({...})", node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


_Loader.add_constructor("!replace", _construct_replace)


def _plain(x: Any) -> Any:
    """Drop the `Replace` markers once merging is done."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged into `base` key by key; a `Replace` mapping in `over` takes the base's place whole."""
    out = dict(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and not isinstance(v, Replace) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else v
    return out


def read_yaml_with_base(path: str | Path) -> dict:
    """Read a YAML config; a top-level `base: other.yaml` (relative to this file) is loaded first and this file's
    keys are deep-merged over it, so a baseline config states only what differs from the one it extends (a mapping
    tagged `!replace` replaces the base's instead; see the module docstring)."""
    return _plain(_read_with_base(Path(path), ()))


def _read_with_base(path: Path, _seen: tuple[Path, ...]) -> dict:
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another YAML file")
    return deep_merge(_read_with_base(path.parent / base, (*_seen, path)), data)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the key's dotted path, e.g. `algo.sigma0: Input should be > 0`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = (
            "unknown key (check spelling; see configs/ for the valid keys)"
            if e["type"] == "extra_forbidden"
            else e["msg"]
        )
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def validate(model_cls: type[M], data: dict, source: str = "config") -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(model_cls: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Read YAML (optional), apply overrides, validate into `model_cls`. Raises ConfigError with one clear line."""
    data = read_yaml_with_base(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return validate(model_cls, data, str(path) if path else "config")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None):
    """The run config (`alp_agent.config.RunConfig`) from an optional YAML file plus dotted overrides."""
    from alp_agent.config import RunConfig

    return load_config(RunConfig, path, overrides)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the fully resolved config (all defaults filled in) so a run directory says exactly what ran."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
