"""Load a recipe: YAML file + ``a.b.c=value`` overrides -> a validated ``Recipe`` and its algorithm's ``AlgoConfig``.

Every mistake becomes one ``UserError`` line that names the file, the line (when the key is in the file), the key and
what was expected.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from aligntool import registry
from aligntool.errors import UserError, first_line
from aligntool.recipe.base import structural_pass
from aligntool.recipe.schema import Recipe, TrainConfig
from aligntool.recipe.suggest import closest, did_you_mean


class SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 scalars: ``1e-4`` is a float, and only true/false are booleans, so
    ``eval_strategy: no`` stays the string "no" (YAML 1.1 would make it False)."""


SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping that names one key twice (YAML keeps the last silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the base constructor report it
            break
        if first is not None:
            raise DuplicateKeyError(problem=f"duplicate key {key!r} (first at line {first.line + 1}); a key may appear "
                                    "once", problem_mark=key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, lambda loader, node: dict(
    _mapping_without_duplicates(loader, node, deep=True)))


def safe_load(text: str):
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 - a SafeLoader subclass: no arbitrary objects


@dataclasses.dataclass
class LoadedRecipe:
    recipe: Recipe
    algo: BaseModel  # the algorithm's AlgoConfig
    spec: registry.AlgorithmSpec
    source: str  # file name, for messages

    @property
    def base_dir(self) -> Path:
        """The recipe's folder: relative files a recipe names (a chat template) are looked for there first."""
        return Path(self.source).expanduser().resolve().parent

    def resolved(self) -> dict:
        """The fully resolved recipe, every default filled in: what the run actually used."""
        data = self.recipe.model_dump(mode="json")
        data["train"] = self.recipe.train.model_dump(mode="json", exclude_none=True)
        data["algo"] = self.algo.model_dump(mode="json")
        return data


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe file, or the name of a built-in recipe (``dpo`` -> aligntool/recipes/dpo.yaml)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    builtin = registry.RECIPES_DIR / f"{recipe}.yaml"
    if "/" not in recipe and not recipe.endswith((".yaml", ".yml")) and builtin.is_file():
        return builtin
    if path.exists():
        raise UserError(f"{recipe}: is not a file (expected a YAML recipe)")
    raise UserError(f"{recipe}: recipe file not found{_recipe_suggestion(recipe, path)}")


def builtin_recipe_names() -> list[str]:
    """The names ``--recipe`` takes for the recipes shipped with aligntool (aligntool/recipes/NAME.yaml)."""
    return sorted(p.stem for p in registry.RECIPES_DIR.glob("*.yaml"))


def _recipe_suggestion(recipe: str, path: Path) -> str:
    """A did-you-mean for a missing recipe: a built-in name close to a bare name (``dop`` -> dpo; ``dpo.yaml`` where
    there is no such file -> dpo), or a YAML file close to the name in the folder it names."""
    names = builtin_recipe_names()
    if "/" not in recipe:
        stem = path.stem if path.suffix in (".yaml", ".yml") else recipe
        name = stem if stem in names else closest(stem, names)
        if name:
            return f" (did you mean the built-in recipe {name!r}? `aligntool recipes` lists them)"
    folder = path.parent
    if folder.is_dir():
        match = closest(path.name, [p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")])
        if match:
            return f" (did you mean {str(folder / match)!r}?)"
    if path.stem in names and path.suffix in (".yaml", ".yml"):  # recipes/dpo.yaml of a clone before 0.1's wheel
        return f" (the built-in recipes ship inside the package: --recipe {path.stem})"
    if "/" not in recipe and not path.suffix:
        return ", and no built-in recipe has that name (`aligntool recipes` lists them)"
    return ""


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r}: expected KEY=VALUE, e.g. train.max_steps=50")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {text!r}: the key {key!r} is not a dotted name like train.learning_rate")
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own: keep it as the plain string the user typed
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _key_lines(text: str, source: str) -> dict[tuple[str, ...], str]:
    """'file:line' of every mapping key in the YAML text, by its path."""
    lines: dict[tuple[str, ...], str] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = (*prefix, str(key.value))
                lines[path] = f"{source}:{key.start_mark.line + 1}"
                walk(value, path)

    try:
        walk(yaml.compose(text, Loader=SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        ann = field.annotation
        model = next((a for a in (ann, *getattr(ann, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


# the names pydantic gives the members of a union in an error's location (``constrained-float``, ``literal['auto']``)
_UNION_TAG = re.compile(r"^(constrained-\w+|literal\[.*\]|function-\w+\[.*\]|int|float|str|bool|none)$")


def _explain(errors: list[dict], root: type[BaseModel], prefix: tuple, source: str, lines: dict) -> UserError:
    """The first of pydantic's ``errors`` as one line: where, which key, what is wrong (did-you-mean for a key)."""
    e = errors[0]
    loc = tuple(str(p) for p in e["loc"] if not _UNION_TAG.match(str(p)))
    if loc != tuple(str(p) for p in e["loc"]):  # a union (e.g. a number or 'auto'): say what each member expects
        same = [x for x in errors if tuple(str(p) for p in x["loc"] if not _UNION_TAG.match(str(p))) == loc]
        e = {**e, "msg": " or ".join(dict.fromkeys(x["msg"].removeprefix("Input should be ").split(", unable")[0]
                                                for x in same))}
        e["msg"] = "input should be " + e["msg"]
    key = ".".join((*prefix, *loc))
    at = lines.get((*prefix, *loc), source)
    if e["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        hint = did_you_mean(loc[-1], parent.model_fields) if parent else ""
        valid = f"; valid keys: {', '.join(parent.model_fields)}" if parent and not hint else ""
        return UserError(f"{at}: unknown key {key!r}{hint}{valid}")
    if e["type"] == "missing":
        return UserError(f"{at}: missing required key {key!r}")
    msg = e["msg"]
    msg = msg.removeprefix("Value error, ")  # our validators' own words, kept as written (names are case-sensitive)
    msg = msg[:1].lower() + msg[1:]
    got = e.get("input")
    got = "" if isinstance(got, dict) else f" (got {got!r})"  # a whole section is too long to echo
    return UserError(f"{at}: {key + ': ' if key else ''}{msg}{got}")


# errors of aligntool's own validators (ValueError): said by the full pass, in its order
_OWN_ERRORS = ("value_error", "assertion_error")


def _validate(model: type[BaseModel], data: dict, prefix: tuple, source: str, lines: dict, structural: bool = False):
    """``model`` validated, or the first error as a UserError. In the structural pass only pydantic's own errors
    (unknown or missing keys, types, ranges) are raised; with none of them, None."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not structural or e["type"] not in _OWN_ERRORS]
        if not errors:
            return None
        raise _explain(errors, model, prefix, source, lines) from None


def _check_train_extras(train: TrainConfig, spec: registry.AlgorithmSpec, source: str, lines: dict) -> None:
    """`train.*` keys outside the documented list must be fields of the algorithm's TRL config."""
    extras = dict(train.model_extra or {})
    if spec.agent == "engine" and "chat_template_kwargs" in extras:  # the engine renders the prompts (TRL's key)
        value = extras.pop("chat_template_kwargs")
        if value is not None and not isinstance(value, dict):
            at = lines.get(("train", "chat_template_kwargs"), source)
            raise UserError(f"{at}: train.chat_template_kwargs: expected a mapping of the chat template's keyword "
                            f"arguments (e.g. {{enable_thinking: false}}), got {value!r}")
    if not extras:
        return
    cls = spec.trl_config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in extras.items():
        at = lines.get(("train", name), source)
        if name not in fields:
            hint = did_you_mean(name, fields | set(TrainConfig.model_fields))
            raise UserError(f"{at}: unknown key 'train.{name}'{hint}; "
                            f"train.* takes fields of {spec.trl_config.split(':')[1]}")
        expected = _scalar_type(cls, name)
        if expected is not None and value is not None and not _fits(value, expected):
            raise UserError(f"{at}: train.{name}: expected {expected.__name__}, got {value!r}")


def _scalar_type(cls, name: str) -> type | None:
    """bool / int / float / str when the TRL config field is one of those (or Optional of one), else None."""
    import typing

    try:
        hint = typing.get_type_hints(cls)[name]
    except Exception:  # noqa: BLE001 - forward references of other libraries
        return None
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
    return options[0] if len(options) == 1 and options[0] in (bool, int, float, str) else None


def _fits(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def read_recipe(recipe: str | Path, overrides: list[str] | tuple = ()) -> tuple[dict, str, dict]:
    """The recipe file's mapping with the overrides applied, its name for messages, and ``file:line`` (or the
    override) of every key -- shared by ``train`` and ``compress`` recipes."""
    path = resolve_recipe_path(str(recipe))
    source = str(recipe)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not a text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not "
                        "UTF-8); a recipe is a YAML text file") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read ({exc.strerror or exc})") from None
    if "\x00" in text:
        raise UserError(f"{source}: not a text file (it contains NUL bytes); a recipe is a YAML text file")
    try:
        data = safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        if isinstance(exc, DuplicateKeyError):
            raise UserError(f"{source}{where}: {exc.problem}") from None
        if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in (exc.problem or ""):
            found = re.search(r"'([^']+)'", exc.problem or "")
            tag = (found.group(1) if found else "?").replace("tag:yaml.org,2002:", "!!")
            raise UserError(f"{source}{where}: YAML tag {tag!r} is not allowed: a recipe is plain data (strings, "
                            "numbers, lists, mappings)") from None
        raise UserError(f"{source}{where}: YAML syntax error: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: YAML error: {first_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of recipe keys at the top level, got {type(data).__name__}")
    for text_override in overrides:
        apply_override(data, *parse_override(text_override), text_override)

    lines = _key_lines(text, source)
    for text_override in overrides:  # an overridden key is reported as the override, not the file line it replaced
        parts = tuple(parse_override(text_override)[0])
        lines[parts] = f"override {text_override!r}"
    return data, source, lines


def load_recipe(recipe: str | Path, overrides: list[str] | tuple = ()) -> LoadedRecipe:
    data, source, lines = read_recipe(recipe, overrides)
    return load_mapping(data, source, lines, resolve_recipe_path(str(recipe)).resolve().parent)


def load_mapping(data: dict, source: str, lines: dict | None = None, base_dir: Path | None = None) -> LoadedRecipe:
    """A recipe's mapping (a YAML file's content with its overrides, or the Python API's dict) validated; ``source``
    and ``lines`` say where each key came from in messages, ``base_dir`` is where its relative files are looked for
    (the recipe's folder; None: the working directory)."""
    lines = {} if lines is None else lines
    if "algorithm" not in data and "compress" in data:
        raise UserError(f"{source}: is a compress recipe (it has 'compress', no 'algorithm'); run it with "
                        "`aligntool compress`")
    if "algorithm" not in data:
        raise UserError(f"{source}: missing required key 'algorithm'; known: {', '.join(registry.ALGORITHMS)}")
    name = data["algorithm"]
    if not isinstance(name, str):
        raise UserError(f"{source}: algorithm: expected a name, got {name!r}")
    try:
        spec = registry.get(name)
    except UserError as exc:
        at = lines.get(("algorithm",), source)
        raise UserError(f"{at}: algorithm: {exc}") from None
    algo_cls = spec.load().AlgoConfig  # a method module imports no torch or TRL at import
    # two passes: pydantic's own checks (keys, types, ranges) first, with no TRL, transformers or torch (instant, and
    # on a machine without torch); then in full: aligntool's validators, in their order, with the checks of values
    # against the installed TRL's / transformers' own lists
    with structural_pass():
        parsed = _validate(Recipe, data, (), source, lines, structural=True)
        if parsed is not None:
            _validate(algo_cls, {**spec.algo_defaults, **parsed.algo}, ("algo",), source, lines, structural=True)
    parsed = _validate(Recipe, data, (), source, lines)
    algo = _validate(algo_cls, {**spec.algo_defaults, **parsed.algo}, ("algo",), source, lines)
    _check_train_extras(parsed.train, spec, source, lines)
    if parsed.reward is not None and not spec.samples:
        at = lines.get(("reward",), source)
        raise UserError(f"{at}: reward: does not apply to algorithm {spec.name!r}, which trains on given data only")
    if parsed.generation.backend not in spec.backends:  # the registry's vllm: TRL's trainer or aligntool's engine
        at = lines.get(("generation",), source)
        raise UserError(f"{at}: generation.backend: {parsed.generation.backend} applies to the online methods "
                        f"({registry.listing(vllm='engine')}) and to {registry.listing(vllm='trl')} (TRL's vLLM "
                        f"generation); {spec.name!r} generates with transformers")
    if parsed.agent is not None and spec.agent is None:
        at = lines.get(("agent",), source)
        hint = (" (TRL's RLOOTrainer takes no tools: use grpo, or reinforce_pp, whose baseline is the group's)"
                if spec.name == "rloo" else "")
        raise UserError(f"{at}: agent: multi-turn tool episodes run with {registry.listing(lambda s: s.agent)}; "
                        f"not with {spec.name!r}{hint}")
    if parsed.agent is not None and not (parsed.agent.tools or parsed.agent.environment):
        at = lines.get(("agent",), source)
        raise UserError(f"{at}: agent: name the tools (agent.tools) or an environment (agent.environment)")
    if parsed.output_dir is None:
        parsed.output_dir = f"runs/{spec.name}"
    if parsed.reward is not None:
        parsed.reward._base_dir = str(base_dir) if base_dir is not None else None
    if parsed.agent is not None:
        parsed.agent._base_dir = str(base_dir) if base_dir is not None else None
    return LoadedRecipe(parsed, algo, spec, source)
