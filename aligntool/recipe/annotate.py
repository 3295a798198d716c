"""A recipe's YAML text with every key commented by its description (``aligntool init``): the schema is the user's
documentation, so the copy a user edits carries it.

Comments only are added, never a value changed: the annotated text loads to the same mapping (tests/test_init.py
checks it for every built-in recipe). Each key of the text gets its description on the lines above it; the keys a
section leaves unset follow it as commented-out lines with their defaults (a section written in flow style, or absent,
is listed at the end of the file), ready to be uncommented.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

WIDTH = 118
# (path of a section) -> its model, for sections whose model is not in the root's annotations (``algo``)
Overrides = dict[tuple[str, ...], type[BaseModel]]


def submodel(annotation) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``X``, ``X | None``, ``list[X] | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = submodel(arg)
        if found is not None:
            return found
    return None


def trl_help(trl_config: type | None) -> dict[str, str]:
    """The help text of every field of a TRL / transformers config dataclass (what ``train.*`` extras are)."""
    if trl_config is None:
        return {}
    return {f.name: " ".join(str(f.metadata.get("help", "")).split()) for f in dataclasses.fields(trl_config)
            if f.metadata.get("help")}


class _Schema:
    """Descriptions and models by key path, under a root model and its overrides."""

    def __init__(self, root: type[BaseModel], overrides: Overrides, extras: dict[tuple[str, ...], dict[str, str]]):
        self.root, self.overrides, self.extras = root, overrides, extras

    def model(self, path: tuple[str, ...]) -> type[BaseModel] | None:
        model: type[BaseModel] | None = self.root
        for i, part in enumerate(path):
            if path[: i + 1] in self.overrides:
                model = self.overrides[path[: i + 1]]
                continue
            field = model.model_fields.get(part) if model else None
            model = submodel(field.annotation) if field else None
        return model

    def describe(self, path: tuple[str, ...]) -> str | None:
        parent = self.model(path[:-1])
        field = parent.model_fields.get(path[-1]) if parent else None
        if field is not None and field.description:
            return field.description
        return self.extras.get(path[:-1], {}).get(path[-1])


def _comment(text: str, indent: int, prefix: str = "") -> list[str]:
    lines = textwrap.wrap(f"{prefix}{text}", width=max(40, WIDTH - indent - 2))
    return [" " * indent + "# " + line for line in lines]


def _scalar(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def _default(field):
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return None


def _unset_lines(model: type[BaseModel], present: set[str], indent: int, schema: _Schema,
                 path: tuple[str, ...]) -> list[str]:
    """Commented-out lines for the fields of ``model`` not in ``present``: description, then ``key: default`` (a
    nested section as its own commented block)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        if name in present:
            continue
        if field.description:
            out += _comment(field.description, indent)
        nested = schema.model((*path, name))
        default = _default(field)
        if nested is not None and (default is None or isinstance(default, BaseModel)) and not _is_list(field):
            out.append(" " * indent + f"# {name}:")
            out += _unset_lines(nested, set(), indent + 2, schema, (*path, name))
            continue
        required = field.default is PydanticUndefined and field.default_factory is None
        out.append(" " * indent + f"# {name}: {'(required)' if required else _scalar(default)}")
    return out


def _is_list(field) -> bool:
    return any(typing.get_origin(a) is list for a in (field.annotation, *typing.get_args(field.annotation)))


def annotate(text: str, root: type[BaseModel], overrides: Overrides | None = None,
             extras: dict[tuple[str, ...], dict[str, str]] | None = None, skip: set[str] = frozenset(),
             header: list[str] = ()) -> str:
    """``text`` (a recipe) with each key's description above it and each section's unset keys after it.
    ``overrides``: models of sections the root does not type (``("algo",)`` -> the method's AlgoConfig); ``extras``:
    descriptions of keys a section accepts beyond its model (``("train",)`` -> the TRL config's help); ``skip``:
    top-level sections not listed when absent (they do not apply to this recipe)."""
    schema = _Schema(root, dict(overrides or {}), dict(extras or {}))
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines = text.splitlines()
    before: dict[int, list[str]] = {}  # line -> comment lines inserted above it
    after: dict[int, list[str]] = {}  # line -> lines inserted below it
    trailer: list[str] = []

    def walk(mapping, path: tuple[str, ...], flow_line: int | None) -> None:
        """Comment the keys of ``mapping``; ``flow_line``: the line a flow collection ({...}, [...]) holding it
        starts on (its keys are said above that line, with their names)."""
        if flow_line is None and mapping.flow_style:
            flow_line = mapping.start_mark.line
        present = set()
        for key_node, value in mapping.value:
            key = str(key_node.value)
            present.add(key)
            line, column = ((flow_line, _indent(lines[flow_line])) if flow_line is not None
                            else (key_node.start_mark.line, key_node.start_mark.column))
            description = schema.describe((*path, key))
            if description:
                prefix = f"{key}: " if flow_line is not None else ""
                before.setdefault(line, []).extend(_comment(description, column, prefix))
            walk_value(value, (*path, key), flow_line)
        model = schema.model(path)
        if model is None:
            return
        if not path:  # the root: the absent sections, at the end
            trailer.extend(_unset_lines(model, present | set(skip), 0, schema, ()))
        elif flow_line is None:
            unset = _unset_lines(model, present, mapping.start_mark.column, schema, path)
            if unset:
                after.setdefault(_last_line(mapping), []).extend(unset)
        else:
            unset = _unset_lines(model, present, 2 * len(path), schema, path)
            if unset:
                trailer.extend(_section_header(path) + unset)

    def walk_value(value, path: tuple[str, ...], flow_line: int | None) -> None:
        if isinstance(value, yaml.MappingNode):
            walk(value, path, flow_line)
        elif isinstance(value, yaml.SequenceNode):
            if flow_line is None and value.flow_style:
                flow_line = value.start_mark.line
            for item in value.value:
                if isinstance(item, yaml.MappingNode):
                    walk(item, path, flow_line)

    if isinstance(node, yaml.MappingNode):
        walk(node, (), None)
    out = list(header)
    for i, line in enumerate(lines):
        out += before.get(i, [])
        out.append(line)
        out += after.get(i, [])
    if trailer:
        out += ["", "# " + "-" * (WIDTH - 2),
                *_comment("Keys and sections this recipe leaves at their defaults: uncomment one under its section to "
                          "set it (or give it on the command line, e.g. model.dtype=bfloat16).", 0),
                *trailer]
    return "\n".join(out) + "\n"


def _section_header(path: tuple[str, ...]) -> list[str]:
    return [" " * (2 * i) + f"# {part}:" for i, part in enumerate(path)]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _last_line(node) -> int:
    """The last line holding content of a block node (not the blank or comment lines after it)."""
    if isinstance(node, yaml.MappingNode) and node.value and not node.flow_style:
        return _last_line(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and node.value and not node.flow_style:
        return _last_line(node.value[-1])
    end = node.end_mark.line
    return end - 1 if node.end_mark.column == 0 and end > node.start_mark.line else end

