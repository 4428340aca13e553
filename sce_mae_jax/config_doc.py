"""The configuration reference (docs/configs.md), generated from the configs so that it cannot drift from them.

    python -m sce_mae_jax.config_doc > docs/configs.md

For every `configs/*.py`: `get_config()` without an argument, flattened to dotted fields with their defaults.
A field's comment is read from the source of the code that set it: the `# ...` at the end of the assignment's
line, or the comment lines right above it. The statements are walked in the order they run, from the config
file's `get_config` into the `config_lib` functions it calls (`s1 = config_lib.mae(...)`, `data_fields(c, ...)`),
so a field gets the last comment written for it (a config file's comment on its own override wins).
`tests/test_config_doc.py` fails when docs/configs.md differs from this output.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import io
import os
import sys
import tokenize

import ml_collections


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Module:
    """A parsed source file: its top-level functions and its comments by line (text, whole line?)."""

    def __init__(self, path: str):
        with open(path) as f:
            self.source = f.read()
        tree = ast.parse(self.source)
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.docstring = ast.get_docstring(tree) or ''
        self.comments = {}
        for tok in tokenize.generate_tokens(io.StringIO(self.source).readline):
            if tok.type == tokenize.COMMENT:
                whole = not tok.line[:tok.start[1]].strip()
                self.comments[tok.start[0]] = (tok.string.lstrip('#').strip(), whole)

    def comment(self, node: ast.AST, after: int, group: bool) -> str:
        """The comment of `node`: at the end of its line (its first line for a group, whose later lines hold
        its fields), else the whole-line comments just above it (below line `after`)."""
        text, whole = self.comments.get(node.lineno if group else node.end_lineno, ('', True))
        if text and not whole:
            return text
        above, line = [], node.lineno - 1
        while line > after and self.comments.get(line, ('', False))[1]:
            above.insert(0, self.comments[line][0])
            line -= 1
        return ' '.join(above)


LIB = _Module(os.path.join(ROOT, 'sce_mae_jax', 'config_lib.py'))


def _path(node: ast.AST, names: dict[str, str]) -> str | None:
    """`c.model.depth` → 'PREFIX.model.depth' when `c` is a config variable with that prefix, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return '.'.join(filter(None, [names[node.id], *attrs]))


def _lib_call(node: ast.AST, module: _Module) -> ast.FunctionDef | None:
    """The config_lib function a call runs: `config_lib.mae(...)` anywhere, `data_fields(...)` inside config_lib."""
    if not isinstance(node, ast.Call):
        return None
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == 'config_lib':
        return LIB.functions.get(f.attr)
    if isinstance(f, ast.Name) and module is LIB:
        return LIB.functions.get(f.id)
    return None


def _returned_name(func: ast.FunctionDef) -> str | None:
    for node in ast.walk(func):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
            return node.value.id
    return None


def _nested_names(func: ast.FunctionDef, names: dict[str, str]) -> None:
    """Variables attached to a config later (`c.stage1 = s1`, `c.evals = ConfigDict({'matching': m})`) get
    their place in it, so what is set on them (before or after) is found under that prefix."""
    changed = True
    while changed:
        changed = False
        for node in ast.walk(func):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            prefix = _path(node.targets[0], names)
            if prefix is None:
                continue
            pairs = [(None, node.value)]
            if isinstance(node.value, ast.Call) and node.value.args and isinstance(node.value.args[0], ast.Dict):
                d = node.value.args[0]
                pairs = [(k.value, v) for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant)]
            for key, value in pairs:
                if isinstance(value, ast.Name) and value.id not in names:
                    names[value.id] = '.'.join(filter(None, [prefix, key]))
                    changed = True


def _fields(module: _Module, path: str, value: ast.AST, node: ast.AST, after: int, out: dict) -> None:
    """Records the comment of `path = value` (`node` the statement or keyword), and of each `key=...` of a
    `dict(...)` value as `path.key`."""
    group = isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == 'dict'
    text = module.comment(node, after, group)
    if text:
        out[path] = text
    if group:
        prev = value.lineno
        for kw in value.keywords:
            if kw.arg is not None:  # not a **splat
                _fields(module, f'{path}.{kw.arg}', kw.value, kw.value, prev, out)
            prev = kw.value.end_lineno


def _walk(module: _Module, func: ast.FunctionDef, names: dict[str, str], out: dict) -> None:
    """The comments of the fields `func` sets, in execution order, into `out`; `names`: config variable →
    prefix, the key None standing for the config that `func` returns."""
    names = dict(names)
    if _returned_name(func) and None in names:
        names[_returned_name(func)] = names[None]
    _nested_names(func, names)
    after = func.body[0].end_lineno if ast.get_docstring(func) else func.lineno
    for stmt in func.body:
        call = stmt.value if isinstance(stmt, (ast.Expr, ast.Return, ast.Assign)) else None
        callee = _lib_call(call, module)
        if callee is not None:
            if isinstance(stmt, ast.Return):      # return config_lib.mae(...): it builds what we return
                inner = {None: names[None]} if None in names else {}
            elif isinstance(stmt, ast.Assign):    # s1 = config_lib.mae(...) / c = _regressor_job(...)
                target = stmt.targets[0]
                inner = {None: names[target.id]} if isinstance(target, ast.Name) and target.id in names else {}
            else:                                 # data_fields(c, ...): fills the config it is given
                inner = {p.arg: names[a.id] for p, a in zip(callee.args.args, call.args)
                         if isinstance(a, ast.Name) and a.id in names}
            _walk(LIB, callee, inner, out)
        if isinstance(stmt, ast.Assign):
            target = stmt.targets[0]
            targets = target.elts if isinstance(target, ast.Tuple) else [target]
            values = stmt.value.elts if isinstance(target, ast.Tuple) and isinstance(stmt.value, ast.Tuple) else [
                stmt.value] * len(targets)
            for t, v in zip(targets, values):
                path = _path(t, names)
                if path:
                    _fields(module, path, v, stmt, after, out)
        after = stmt.end_lineno


def _flatten(config: ml_collections.ConfigDict, prefix: str = ''):
    """(dotted field, its default as text) in key order; (group, None) before a group's fields."""
    for key in config.keys():
        path = f'{prefix}{key}'
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield path, None
            yield from _flatten(value, path + '.')
        else:
            yield path, repr(value) if value is not None else f'None ({config.get_type(key).__name__})'


def _cell(text) -> str:
    return str(text).replace('|', '\\|')


def config_section(path: str) -> str:
    module = _Module(path)
    spec = importlib.util.spec_from_file_location('sce_mae_jax_config_doc', path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    config = loaded.get_config()
    get_config = module.functions['get_config']
    comments = {}
    _walk(module, get_config, {None: ''}, comments)
    rel = os.path.relpath(path, ROOT)
    lines = [f'## `{rel}`', '', module.docstring.split('\n\n')[0].replace('\n', ' '), '',
             '| field | default | comment |', '|---|---|---|']
    for field, shown in _flatten(config):  # shown: the default as text, None for a group
        if shown is None and field not in comments:
            continue  # a group without a comment of its own: its fields follow
        default = '' if shown is None else f'`{_cell(shown)}`'
        lines.append(f'| `{field}` | {default} | {_cell(comments.get(field, ""))} |')
    return '\n'.join(lines)


HEADER = """# Configuration reference

Every field of every job config in `configs/`, with its default (`get_config()` without an argument) and the
comment written next to it in the config file or in `sce_mae_jax/config_lib.py`. **Generated**: run
`python -m sce_mae_jax.config_doc > docs/configs.md` after changing a config; `tests/test_config_doc.py` fails
when this file is out of date. Change a field with `--config.FIELD=VALUE` (`--config.carb.eta=0.25`); unknown
fields are rejected. The variants after `:` (`configs/carb_deit_s.py:data=celeba,dim=256,ablation=no_lcr`)
change several fields at once; each config's docstring lists them. Fields of the pipeline configs
(`quickstart.py`, `synthetic_benchmark.py`) are those of the jobs they chain, under `stage1.`, `stage2.` and
`evals.NAME.`. A group row (no default) carries the comment written for the whole group.
"""


def render() -> str:
    paths = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
    return HEADER + '\n' + '\n\n'.join(config_section(p) for p in paths) + '\n'


if __name__ == '__main__':
    sys.stdout.write(render())
