"""Playbooks: load and validate the YAML, then resolve it for one host into a plan.

Loading checks the structure (keys, types, ids, needs, cycles, kinds) and points at file:line
and the step id. Resolving renders every string with jinja2 (StrictUndefined) from the playbook
vars, the inventory vars and the host's vars, validates each kind's params, lets kinds resolve
controller-side inputs (templates), selects steps by tag, adds the implicit steps kinds need
(`agent-venv` for library kinds, `tool-NAME` for the executables they run, see
`provision.steps.box_tool`), orders checks after installs (`Kind.runs_after`), and fingerprints
each step. The plan is plain JSON and holds no secret value.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from provision import dag
from provision.cache import plan as step_cache
from provision.errors import ConfigError
from provision.inventory import Host, Inventory
from provision.model import Plan, PlannedStep
from provision.steps import box_tool
from provision.steps.base import MAX_POLL_S, SECRET_MARK, ParamError, validate_params
from provision.steps.registry import get_kind, kind_names
from provision.yamlsrc import LineMap, load_yaml

COMMON_KEYS = (
    "id",
    "kind",
    "needs",
    "creates",
    "done_when",
    "timeout",
    "retries",
    "poll",
    "env",
    "secrets",
    "tags",
    "estimate",
    "description",
    "outputs",
    "cache",
)
TOP_KEYS = ("name", "description", "vars", "steps", "max_parallel", "cache")
_ID = re.compile(r"^[a-z0-9_-]+$")
#: Step ids and the playbook's name name files and directories on the box (`logs/ID.log`,
#: `.ID.json.PID.tmp`): well under the 255 bytes a file name may have.
MAX_ID_LEN = 100
_SECRET_REF = re.compile(re.escape(SECRET_MARK).replace(r"\{\}", r"([A-Za-z0-9_]+)"))
AGENT_VENV_ID = "agent-venv"
_RESERVED_IDS = {AGENT_VENV_ID, *(box_tool.step_id(t) for t in box_tool.TOOLS)}
#: Steps with this tag run only when asked for by tag (like Ansible's `never`).
NEVER_TAG = "never"


@dataclass
class Step:
    """One step as written, with its line for errors."""

    id: str
    kind: str
    raw: LineMap
    line: int
    needs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        """The kind-specific keys (everything that is not a common key)."""
        return {k: v for k, v in self.raw.items() if k not in COMMON_KEYS}


@dataclass
class Playbook:
    """A validated playbook."""

    path: Path
    name: str
    vars: dict[str, Any]
    steps: list[Step]
    max_parallel: int = 8
    description: str = ""
    #: The playbook's `cache:` mapping as written (remote, max_size_gb, rclone_config).
    cache: dict[str, Any] = field(default_factory=dict)
    cache_line: int = 0

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        close = difflib.get_close_matches(step_id, [s.id for s in self.steps], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"no step '{step_id}'{hint}", file=str(self.path))

    @property
    def needs(self) -> dict[str, list[str]]:
        return {s.id: s.needs for s in self.steps}


def load_playbook(path: Path) -> Playbook:
    """Load and structurally validate a playbook file."""
    data = load_yaml(path)
    src = str(path)
    if not isinstance(data, LineMap):
        raise ConfigError("a playbook must be a mapping with 'name' and 'steps'", file=src, line=1)
    _no_unknown(data, TOP_KEYS, src, None, "playbook")
    name = data.get("name")
    if not isinstance(name, str) or not _ID.match(name):
        raise ConfigError(
            "'name' must be set and match [a-z0-9_-]+ (it names the run on the box)",
            file=src,
            line=data.line_of("name"),
        )
    if len(name) > MAX_ID_LEN:
        raise ConfigError(
            f"'name' is {len(name)} characters; at most {MAX_ID_LEN} (it names the run's "
            "directory on the box)",
            file=src,
            line=data.line_of("name"),
        )
    pvars = data.get("vars") or {}
    if not isinstance(pvars, dict):
        raise ConfigError("'vars' must be a mapping", file=src, line=data.line_of("vars"))
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError("'steps' must be a non-empty list", file=src, line=data.line_of("steps"))
    max_parallel = data.get("max_parallel", 8)
    if not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 1:
        raise ConfigError(
            "'max_parallel' must be a positive integer", file=src, line=data.line_of("max_parallel")
        )
    steps = [_step(raw, src, raw_steps, i) for i, raw in enumerate(raw_steps)]
    _check_graph(steps, src)
    book_cache = step_cache.check_playbook(data.get("cache"), src, data.line_of("cache"))
    step_cache.check_units(steps, src)
    return Playbook(
        path,
        name,
        dict(pvars),
        steps,
        max_parallel,
        str(data.get("description") or ""),
        book_cache,
        data.line_of("cache"),
    )


def _no_unknown(
    data: LineMap, known: tuple[str, ...], src: str, step: str | None, what: str
) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key '{key}' in {what}{hint}", file=src, line=data.line_of(key), step=step
            )


def _step(raw: Any, src: str, seq: Any, index: int) -> Step:
    line = seq.item_lines[index] if hasattr(seq, "item_lines") else 0
    if not isinstance(raw, LineMap):
        raise ConfigError("each step must be a mapping with 'id' and 'kind'", file=src, line=line)
    step_id = raw.get("id")
    if not isinstance(step_id, str) or not _ID.match(step_id):
        raise ConfigError(
            f"step id must match [a-z0-9_-]+, got {step_id!r}", file=src, line=raw.line_of("id")
        )
    if len(step_id) > MAX_ID_LEN:
        raise ConfigError(
            f"step id is {len(step_id)} characters ({step_id[:20]}...); at most {MAX_ID_LEN} "
            "(it names the step's log and files on the box)",
            file=src,
            line=raw.line_of("id"),
        )
    if step_id in _RESERVED_IDS:
        # The implicit steps have these ids; a user step with one would replace that step.
        raise ConfigError(
            f"step id '{step_id}' is reserved for bootstrap's own implicit steps",
            file=src,
            line=raw.line_of("id"),
        )

    def err(message: str, key: str | None = None) -> ConfigError:
        return ConfigError(
            message, file=src, line=raw.line_of(key) if key else raw.line, step=step_id
        )

    kind_name = raw.get("kind")
    kind = get_kind(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        close = difflib.get_close_matches(str(kind_name), kind_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return_err = f"unknown kind {kind_name!r}{hint}; kinds: {', '.join(kind_names())}"
        raise err(return_err, "kind")
    known_params = {p.name for p in kind.params}
    for key in raw:
        if key not in COMMON_KEYS and key not in known_params:
            close = difflib.get_close_matches(str(key), [*COMMON_KEYS, *known_params], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise err(f"unknown key '{key}' for kind '{kind_name}'{hint}", key)
    needs = _str_list(raw, "needs", err)
    tags = _str_list(raw, "tags", err)
    _str_list(raw, "secrets", err)
    # A number may also be a `{{ var }}`: it is checked again once rendered (`_numbers`).
    _numbers({k: raw.get(k) for k in NUMBER_KEYS if not _templated(raw.get(k))}, err)
    env = raw.get("env")
    if env is not None and (
        not isinstance(env, dict)
        or not all(isinstance(v, (str, int, float, bool)) for v in env.values())
    ):
        raise err("'env' must map names to strings", "env")
    for key in ("creates", "done_when"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise err(f"'{key}' must be a string", key)
    step_cache.check_step(raw, err)
    return Step(step_id, str(kind_name), raw, raw.line, needs, tags)


NUMBER_KEYS = ("timeout", "estimate", "retries", "poll")


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _numbers(values: dict[str, Any], err: Any) -> dict[str, Any]:
    """Check timeout/estimate (seconds > 0), retries (int >= 0), poll (1..30 s)."""
    for key in ("timeout", "estimate"):
        value = values.get(key)
        if value is not None and (not _is_number(value) or value <= 0):
            raise err(f"'{key}' must be a positive number of seconds", key)
    retries = values.get("retries")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
    ):
        raise err("'retries' must be a non-negative integer", "retries")
    poll = values.get("poll")
    if poll is not None and (not _is_number(poll) or not 1 <= poll <= MAX_POLL_S):
        raise err(f"'poll' must be between 1 and {MAX_POLL_S:.0f} seconds", "poll")
    return values


def _is_number(value: Any) -> bool:
    # YAML's .nan and .inf are floats too; neither is a usable number of seconds.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str_list(raw: LineMap, key: str, err: Any) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise err(f"'{key}' must be a list of strings", key)
    return list(value)


def _check_graph(steps: list[Step], src: str) -> None:
    seen: dict[str, Step] = {}
    for step in steps:
        if step.id in seen:
            raise ConfigError(
                f"duplicate step id (first at line {seen[step.id].line})",
                file=src,
                line=step.line,
                step=step.id,
            )
        seen[step.id] = step
    for step in steps:
        for need in step.needs:
            if need not in seen and need != AGENT_VENV_ID:
                close = difflib.get_close_matches(need, list(seen), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"needs unknown step '{need}'{hint}",
                    file=src,
                    line=step.raw.line_of("needs"),
                    step=step.id,
                )
    try:
        dag.topo_order({s.id: s.needs for s in steps})
    except dag.CycleFound as exc:
        first = seen[exc.cycle[0]]
        raise ConfigError(
            f"cycle in needs: {' -> '.join(exc.cycle)}", file=src, line=first.line, step=first.id
        ) from None


# ---------------------------------------------------------------------------------- resolving


class _Tools:
    """`ResolveTools` for kinds: templates next to the playbook, local files."""

    def __init__(self, book: Playbook, context: dict[str, Any], step: Step) -> None:
        self.book = book
        self.context = context
        self.step = step

    def _base(self) -> Path:
        # playbooks/x.yaml -> templates/ beside playbooks/, or beside the playbook itself.
        for base in (self.book.path.parent.parent, self.book.path.parent):
            if (base / "templates").is_dir():
                return base
        return self.book.path.parent

    def render_template(self, name: str) -> str:
        path = self._base() / "templates" / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"template '{name}': {exc.strerror} ({path})",
                file=str(self.book.path),
                line=self.step.line,
                step=self.step.id,
            ) from None
        context = dict(self.context)
        context["secrets"] = _SecretMarks()
        return str(_render(text, context, str(path), self.step))

    def read_local(self, path: str) -> bytes:
        full = self.book.path.parent / path
        try:
            return full.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {full}: {exc.strerror}",
                file=str(self.book.path),
                line=self.step.line,
                step=self.step.id,
            ) from None


class _SecretMarks:
    """In templates, `{{ secrets.NAME }}` renders a placeholder the agent fills on the box."""

    def __getattr__(self, name: str) -> str:
        return SECRET_MARK.format(name)

    __getitem__ = __getattr__


class _NoSecrets:
    """Outside templates a secret must reach a step as an env var, never as text in params."""

    def __getattr__(self, name: str) -> str:
        raise jinja2.UndefinedError(
            f"secrets.{name} may only be used in templates; name it in the step's 'secrets:' "
            f"and read ${name} from the environment"
        )

    __getitem__ = __getattr__


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_SINGLE_EXPR = re.compile(r"^\s*\{\{[^{}]*\}\}\s*$")


# Compiled once per text: a fleet renders the same strings for every host, and compiling is
# most of the cost (16 hosts of a 15-step playbook: 139 ms of CPU, 9 ms with these caches).
@functools.lru_cache(maxsize=4096)
def _template(text: str) -> jinja2.Template:
    return _ENV.from_string(text)


@functools.lru_cache(maxsize=4096)
def _expression(expression: str) -> Any:
    return _ENV.compile_expression(expression, undefined_to_none=False)


def _render(text: str, context: dict[str, Any], src: str, step: Step | None) -> Any:
    """Render one string; a string that is one `{{ expr }}` keeps the expression's type."""
    if "{{" not in text and "{%" not in text:
        return text
    try:
        if _SINGLE_EXPR.match(text):
            # The expression's own value: a var "3.10" stays the string "3.10", an int stays
            # an int (a native render would literal_eval its text and give the float 3.1).
            expression = text.strip()[2:-2]
            value = _expression(expression)(context)
            if isinstance(value, jinja2.Undefined):
                str(value)  # raises UndefinedError with the variable's name
            return value
        return _template(text).render(context)
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None) if step is None else step.line
        raise ConfigError(
            f"template error: {exc.message or exc}",
            file=src,
            line=line,
            step=step.id if step else None,
        ) from None


def _render_tree(value: Any, context: dict[str, Any], src: str, step: Step | None) -> Any:
    if isinstance(value, str):
        return _render(value, context, src, step)
    if isinstance(value, list):
        return [_render_tree(v, context, src, step) for v in value]
    if isinstance(value, dict):
        return {
            _render(k, context, src, step) if isinstance(k, str) else k: _render_tree(
                v, context, src, step
            )
            for k, v in value.items()
        }
    return value


def host_context(
    book: Playbook, inv: Inventory, host: Host, extra: dict[str, Any]
) -> dict[str, Any]:
    """Variables for one host: playbook vars < inventory vars < host vars < command line.

    Vars may refer to other vars: each is rendered once, after the vars it names, so a value
    that holds `{{` once rendered (`{% raw %}`) keeps it. Command-line values (`-e`) are
    literals, never rendered: `-e 'msg={{5}}'` is the text `{{5}}`.
    """
    src = str(book.path)
    merged: dict[str, Any] = {}
    for layer in (book.vars, inv.vars, host.vars):
        merged.update(layer)
    literal = {**extra, "host": host.name, "playbook": book.name}
    for name in literal:
        merged.pop(name, None)
    context: dict[str, Any] = {**literal, "secrets": _NoSecrets()}
    for name in _var_order(merged, src):
        context[name] = _render_tree(merged[name], context, src, None)
    return context


def _var_order(variables: dict[str, Any], src: str) -> list[str]:
    """Var names, each after the vars its value refers to; ConfigError on a cycle."""
    needs = {name: sorted(_names_in(value) & variables.keys()) for name, value in variables.items()}
    try:
        return dag.topo_order(needs)
    except dag.CycleFound as exc:
        raise ConfigError(
            f"vars refer to each other in a cycle: {' -> '.join(exc.cycle)}", file=src
        ) from None


def _names_in(value: Any) -> set[str]:
    """The variable names jinja2 expressions in `value` (strings, lists, dict keys) use."""
    if isinstance(value, str):
        return set(_referenced(value)) if "{{" in value or "{%" in value else set()
    if isinstance(value, list):
        return set().union(*(_names_in(v) for v in value))
    if isinstance(value, dict):
        return set().union(*(_names_in(k) | _names_in(v) for k, v in value.items()))
    return set()


@functools.lru_cache(maxsize=4096)
def _referenced(text: str) -> frozenset[str]:
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(text)))
    except jinja2.TemplateSyntaxError:
        return frozenset()  # rendering it reports the error, with its line


def resolve(
    book: Playbook,
    inv: Inventory,
    host: Host,
    *,
    tags: list[str] | None = None,
    extra_vars: dict[str, Any] | None = None,
) -> Plan:
    """The plan for one host: resolved, validated, selected and fingerprinted steps."""
    context = host_context(book, inv, host, extra_vars or {})
    src = str(book.path)
    steps = [_resolve_step(book, s, context, src, inv) for s in book.steps]
    selected = select(book, tags)
    venv_step = _agent_venv(steps, selected, host, context)
    if venv_step is not None:
        steps.insert(0, venv_step)
        selected.add(AGENT_VENV_ID)
    tool_steps = _tool_steps(steps, selected)
    steps[0:0] = tool_steps
    selected.update(s.id for s in tool_steps)
    _order_after_installs(steps, selected)
    steps = _cache_attached(steps, _render_tree(book.cache, context, src, None), context, src)
    for step in steps:
        step.selected = step.id in selected
    agent_python = context.get("agent_python")
    return Plan(
        name=book.name,
        steps=steps,
        playbook=str(book.path),
        host=host.name,
        max_parallel=book.max_parallel,
        agent_python=str(agent_python) if agent_python else None,
    )


def _cache_attached(
    steps: list[PlannedStep], book_cache: dict[str, Any], context: dict[str, Any], src: str
) -> list[PlannedStep]:
    """The steps with their cache specs completed, or dropped with no remote (provision/cache/
    plan.py works on the steps as plan.json holds them)."""
    held = [s.to_json() for s in steps]
    step_cache.attach(book_cache, context, held, src)
    return [PlannedStep.from_json(s) for s in held]


def _param_line(raw: LineMap, key: str) -> int:
    """Line of a param key; a dotted key (`checkpoints.keep`) is looked up in nested mappings."""
    head, _, rest = key.partition(".")
    inner = raw.get(head)
    if rest and isinstance(inner, LineMap) and rest.split(".")[0] in inner:
        return _param_line(inner, rest)
    return raw.line_of(head)


class _AnyName(dict):  # type: ignore[type-arg]
    """Secret sources that have every name: resolving offline needs no secret's value."""

    def __contains__(self, name: object) -> bool:
        return True


def resolve_step(
    book: Playbook, step_id: str, extra_vars: dict[str, Any] | None = None
) -> PlannedStep:
    """One step resolved without an inventory or secrets (the playbook's vars and `extra_vars`,
    on a `local` host): for offline use, such as `bootstrap diagnose LOG --step STEP`."""
    step = book.step(step_id)
    inv = Inventory(path=None, secret_sources=_AnyName())
    context = host_context(book, inv, Host(name="local", connection="local"), extra_vars or {})
    return _resolve_step(book, step, context, str(book.path), inv)


def _resolve_step(
    book: Playbook, step: Step, context: dict[str, Any], src: str, inv: Inventory
) -> PlannedStep:
    kind = get_kind(step.kind)
    assert kind is not None  # checked at load
    raw = step.params()
    params = _render_tree(raw, context, src, step)
    try:
        params = validate_params(kind, params)
    except ParamError as exc:
        line = _param_line(step.raw, exc.key) if exc.key else step.line
        raise ConfigError(str(exc), file=src, line=line, step=step.id) from None
    params = kind.resolve(params, _Tools(book, context, step))
    common = {
        k: _render_tree(step.raw.get(k), context, src, step) for k in ("creates", "done_when")
    }
    numbers = _numbers(
        {k: _render_tree(step.raw.get(k), context, src, step) for k in NUMBER_KEYS},
        lambda message, key: ConfigError(
            message, file=src, line=step.raw.line_of(key), step=step.id
        ),
    )
    numbers["retries"] = numbers["retries"] or 0
    env = {
        k: str(v) for k, v in _render_tree(step.raw.get("env") or {}, context, src, step).items()
    }
    secrets = list(step.raw.get("secrets") or [])
    secrets += [params[p.name] for p in kind.params if p.secret_ref and params.get(p.name)]
    secrets += _SECRET_REF.findall(json.dumps(params))
    secrets = sorted(set(secrets))
    for name in secrets:
        if name not in inv.secret_sources:
            known = ", ".join(sorted(inv.secret_sources)) or "none"
            raise ConfigError(
                f"uses secret '{name}' that the inventory does not define (inventory secrets: {known})",
                file=src,
                line=step.raw.line_of("secrets"),
                step=step.id,
            )
    resolved = PlannedStep(
        id=step.id,
        kind=step.kind,
        params=params,
        needs=list(step.needs),
        creates=_text(common, "creates", step, src),
        done_when=_text(common, "done_when", step, src),
        timeout=numbers["timeout"],
        retries=numbers["retries"],
        poll=numbers["poll"],
        estimate=numbers["estimate"],
        env=env,
        secrets=secrets,
        tags=list(step.tags),
        line=step.line,
    )
    if step.raw.get("outputs") is not None:
        resolved.outputs = step_cache.render_paths(
            _render_tree(step.raw["outputs"], context, src, step), "outputs", src, step
        )
    resolved.fingerprint = fingerprint(resolved)
    # Completed (or dropped, with no remote) by step_cache.attach.
    resolved.cache = step_cache.step_spec(
        _render_tree(step.raw.get("cache"), context, src, step), step, src
    )
    return resolved


def _text(common: dict[str, Any], key: str, step: Step, src: str) -> str | None:
    """A rendered `creates`/`done_when`: text (a `{{ var }}` may render to another type)."""
    value = common[key]
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(
        f"'{key}' must render to a string, not {type(value).__name__} {value!r}",
        file=src,
        line=step.raw.line_of(key),
        step=step.id,
    )


def fingerprint(step: PlannedStep) -> str:
    """Hash of what the step does: changing any of it re-runs the step (not timeouts or tags)."""
    what = step.fingerprinted()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def select(book: Playbook, tags: list[str] | None) -> set[str]:
    """Selected step ids: the tagged ones and everything they need.

    Without tags: every step except those tagged `never` (on-demand steps such as a final
    `wandb sync`), unless a selected step needs them.
    """
    if not tags:
        return dag.upstream(book.needs, [s.id for s in book.steps if NEVER_TAG not in s.tags])
    known = {t for s in book.steps for t in s.tags}
    unknown = [t for t in tags if t not in known]
    if unknown:
        raise ConfigError(
            f"no step has tag(s) {', '.join(unknown)} (tags: {', '.join(sorted(known)) or 'none'})",
            file=str(book.path),
        )
    roots = [s.id for s in book.steps if set(s.tags) & set(tags)]
    return dag.upstream(book.needs, roots)


def _agent_venv(
    steps: list[PlannedStep], selected: set[str], host: Host, context: dict[str, Any]
) -> PlannedStep | None:
    """The implicit step creating the agent's venv, made a need of the library kinds' steps."""
    users = []
    requirements: set[str] = set()
    for step in steps:
        kind = get_kind(step.kind)
        wants = AGENT_VENV_ID in step.needs or (kind is not None and kind.pip)
        if wants and step.id in selected:
            users.append(step)
            requirements.update(kind.pip if kind is not None else ())
    if not users or context.get("agent_python"):
        for step in steps:  # an explicit need of the venv is met by the given interpreter
            step.needs = [n for n in step.needs if n != AGENT_VENV_ID]
        return None
    local = host.connection == "local"
    params = {
        "requirements": sorted(requirements),
        "python": context.get("agent_base_python") or (sys.executable if local else "python3"),
        "system_site_packages": bool(context.get("agent_system_site_packages", local)),
    }
    step = _implicit_step(AGENT_VENV_ID, "agent_venv", params, timeout=900, estimate=30)
    for user in users:
        if AGENT_VENV_ID not in user.needs:
            user.needs = [AGENT_VENV_ID, *user.needs]
    return step


def _tool_steps(steps: list[PlannedStep], selected: set[str]) -> list[PlannedStep]:
    """One implicit `box_tool` step per tool the selected steps' kinds run, made their need."""
    users: dict[str, list[PlannedStep]] = {}
    for step in steps:
        kind = get_kind(step.kind)
        if kind is None or step.id not in selected:
            continue
        wanted = kind.required_tools(step.params) + (("rclone",) if step.cache else ())
        for tool in box_tool.installable(wanted):
            users.setdefault(tool, []).append(step)
    made = []
    for tool in sorted(users):
        tool_id = box_tool.step_id(tool)
        step = _implicit_step(tool_id, "box_tool", {"tool": tool}, timeout=900, estimate=10)
        made.append(step)
        for user in users[tool]:
            if tool_id not in user.needs:
                user.needs = [tool_id, *user.needs]
    return made


def _order_after_installs(steps: list[PlannedStep], selected: set[str]) -> None:
    """Make each step whose kind `runs_after` some kinds need the selected steps of those kinds,
    except the ones that depend on it (that edge would be a cycle)."""
    by_kind: dict[str, list[str]] = {}
    for step in steps:
        if step.id in selected:
            by_kind.setdefault(step.kind, []).append(step.id)
    for step in steps:
        kind = get_kind(step.kind)
        if kind is None or step.id not in selected or not kind.runs_after:
            continue
        needs = {s.id: s.needs for s in steps}
        after = dag.downstream(needs, [step.id])
        for other_kind in kind.runs_after:
            for other in by_kind.get(other_kind, []):
                if other not in after and other not in step.needs:
                    step.needs = [*step.needs, other]


def _implicit_step(
    step_id: str, kind: str, params: dict[str, Any], *, timeout: int, estimate: int
) -> PlannedStep:
    """A step the engine adds (no line in the playbook): retried once, like a flaky mirror."""
    step = PlannedStep(
        id=step_id, kind=kind, params=params, timeout=timeout, retries=1, estimate=estimate
    )
    step.fingerprint = fingerprint(step)
    return step
