"""The package's layout rules, checked on its source (ast; nothing is run):

* data flows one way: no import cycles between sevenn_mf modules (imports
  inside functions count too; edges into or out of a package ``__init__`` do
  not, they only re-export);
* a module's private helpers stay private: no ``from X import _name`` across
  sevenn_mf modules, except from ``sevenn_mf._sevenn``;
* ``sevenn_mf/_sevenn.py`` is the only module that touches sevenn internals:
  elsewhere no import of a private sevenn module or name (``sevenn._keys``
  and friends come through ``_sevenn``), no private attribute of a sevenn
  name, and no assignment into sevenn (monkeypatching).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
SEVENN_BRIDGE = '_sevenn'


def _private(name: str) -> bool:
    return name.startswith('_') and not name.startswith('__')


def _modules(root: Path) -> Dict[str, Path]:
    mods = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        mods['.'.join(parts)] = path
    return mods


def _resolve(cur: str, mods: Dict[str, Path], node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ''
    pkg = cur if mods[cur].name == '__init__.py' else cur.rsplit('.', 1)[0]
    parts = pkg.split('.')
    parts = parts[: len(parts) - node.level + 1]
    return '.'.join(parts + ([node.module] if node.module else []))


def check_package(root: Path) -> Tuple[List[List[str]], List[str], List[str]]:
    """(import cycles, private names imported across modules, sevenn
    internals touched outside the bridge module)."""
    mods = _modules(root)
    pkg = root.name
    edges: Dict[str, Set[str]] = {}
    private, internals = [], []
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        is_bridge = m == f'{pkg}.{SEVENN_BRIDGE}'
        sevenn_names: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split('.')[0] == 'sevenn':
                        sevenn_names.add(a.asname or a.name.split('.')[0])
                        if (
                            any(_private(p) for p in a.name.split('.'))
                            and not is_bridge
                        ):
                            internals.append(f'{m}: import {a.name}')
                    elif a.name.split('.')[0] == pkg:
                        _add_edge(edges, mods, m, a.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(m, mods, node)
                top = base.split('.')[0]
                if top == 'sevenn':
                    for a in node.names:
                        sevenn_names.add(a.asname or a.name)
                        bad = any(_private(p) for p in base.split('.')) or _private(
                            a.name
                        )
                        if bad and not is_bridge:
                            internals.append(f'{m}: from {base} import {a.name}')
                elif top == pkg:
                    for a in node.names:
                        sub = f'{base}.{a.name}'
                        target = sub if sub in mods else base
                        _add_edge(edges, mods, m, target)
                        bridge = target == f'{pkg}.{SEVENN_BRIDGE}' or (
                            sub == f'{pkg}.{SEVENN_BRIDGE}'
                        )
                        if _private(a.name) and not bridge and target != m:
                            private.append(f'{m}: {a.name} from {target}')
        if is_bridge:
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in sevenn_names
            ):
                if _private(node.attr):
                    internals.append(f'{m}: {node.value.id}.{node.attr}')
                if isinstance(node.ctx, ast.Store):
                    internals.append(f'{m}: assigns {node.value.id}.{node.attr}')
    return _cycles(edges), private, internals


def _add_edge(edges, mods, src: str, target: str) -> None:
    while target and target not in mods:
        target = target.rsplit('.', 1)[0] if '.' in target else ''
    if not target or target == src:
        return
    if mods[src].name == '__init__.py' or mods[target].name == '__init__.py':
        return
    edges.setdefault(src, set()).add(target)


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles, _, _ = check_package(REPO / 'sevenn_mf')
    assert cycles == []


def test_no_private_names_across_modules():
    _, private, _ = check_package(REPO / 'sevenn_mf')
    assert private == []


def test_only_the_bridge_touches_sevenn_internals():
    _, _, internals = check_package(REPO / 'sevenn_mf')
    assert internals == []


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    root = tmp_path / 'pkg'
    (root / 'sub').mkdir(parents=True)
    files = {
        '__init__.py': 'from .a import f\n',
        '_sevenn.py': 'from sevenn.train.dataload import _set_atoms_y\n',
        'a.py': 'from .b import g\ndef f():\n    from . import b\n',
        'b.py': 'def g():\n    from .a import f\n',
        'c.py': 'from .sub.d import _helper\nfrom ._sevenn import KEY\n',
        'sub/__init__.py': '',
        'sub/d.py': textwrap.dedent("""
            import sevenn._keys as KEY
            import sevenn.util as util
            from sevenn.train.dataload import _set_atoms_y
            def _helper():
                util.download_checkpoint = None
                return util._private_thing
        """),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    cycles, private, internals = check_package(root)
    assert cycles == [['pkg.a', 'pkg.b']]
    assert private == ['pkg.c: _helper from pkg.sub.d']
    assert sorted(internals) == sorted(
        [
            'pkg.sub.d: import sevenn._keys',
            'pkg.sub.d: from sevenn.train.dataload import _set_atoms_y',
            'pkg.sub.d: assigns util.download_checkpoint',
            'pkg.sub.d: util._private_thing',
        ]
    )


def test_data_layer_does_not_import_the_layers_above():
    """sevenn_mf/data/ knows nothing of training, models' checkpoints or
    analysis (it may build fidelity names into a config via model.py)."""
    above = ('train', 'analysis', 'cli', 'evaluate', 'deploy', 'calculator')
    offenders = []
    for path in (REPO / 'sevenn_mf' / 'data').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                mod = (node.module or '').split('.')[0]
                if mod in above:
                    offenders.append(f'{path.name}: from {"." * node.level}{mod}')
    assert offenders == [], offenders
