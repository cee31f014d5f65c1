"""Helpers for tests that drive a real LAMMPS with SevenNet's pair styles.

The LAMMPS binary is built by ``scripts/build_lammps.sh`` (serial by default,
``--mpi`` for the MPI one) into a cache outside the repository::

    ${SEVENN_MF_LAMMPS_CACHE:-~/.cache/sevenn_mf/lammps}/<key>/bin/lmp
    key = lammps-20250204_sevenn-<ver>_torch-<ver>_<serial|mpi>

Typical use in a test module::

    from lammps_utils import find_lmp, run_lammps, skip_reason

    LMP = find_lmp('serial')
    pytestmark = pytest.mark.skipif(LMP is None, reason=skip_reason('serial'))
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

LAMMPS_KEYVER = '20250204'  # keep in sync with scripts/build_lammps.sh
ENV_VARS = {'serial': 'SEVENN_MF_LMP', 'mpi': 'SEVENN_MF_LMP_MPI'}
BUILD_SCRIPT = 'scripts/build_lammps.sh'


class LammpsError(RuntimeError):
    """A LAMMPS run failed or timed out; the message holds the output tail."""


def _check_kind(kind: str) -> None:
    if kind not in ENV_VARS:
        raise ValueError(f"kind must be 'serial' or 'mpi', not {kind!r}")


def lammps_cache_dir() -> Path:
    root = os.environ.get('SEVENN_MF_LAMMPS_CACHE')
    if root:
        return Path(root).expanduser()
    return Path.home() / '.cache' / 'sevenn_mf' / 'lammps'


def _sanitize(version: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]', '-', version)


def cache_key(kind: str = 'serial') -> str:
    """Cache key of scripts/build_lammps.sh for the installed sevenn/torch."""
    _check_kind(kind)
    sevenn_ver = importlib.metadata.version('sevenn')
    torch_ver = importlib.metadata.version('torch')
    return (
        f'lammps-{LAMMPS_KEYVER}_sevenn-{_sanitize(sevenn_ver)}'
        f'_torch-{_sanitize(torch_ver)}_{kind}'
    )


def cached_lmp_path(kind: str = 'serial') -> Path:
    """Where scripts/build_lammps.sh puts the binary (may not exist)."""
    return lammps_cache_dir() / cache_key(kind) / 'bin' / 'lmp'


def _lmp_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    out = dict(os.environ)
    if env:
        out.update(env)
    out.setdefault('OMP_NUM_THREADS', '1')
    # an MPI-built lmp started without mpirun (singleton) as root
    out.setdefault('OMPI_ALLOW_RUN_AS_ROOT', '1')
    out.setdefault('OMPI_ALLOW_RUN_AS_ROOT_CONFIRM', '1')
    return out


@functools.cache
def _lmp_help(lmp: str) -> Optional[str]:
    try:
        res = subprocess.run(
            [lmp, '-h'],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            env=_lmp_env(),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def lmp_features(lmp: Union[str, Path]) -> Optional[Dict[str, bool]]:
    """Parse ``lmp -h``: which e3gnn styles it has and whether it is an MPI build.

    Returns None when the binary cannot run.
    """
    text = _lmp_help(str(lmp))
    if not text:
        return None
    styles = set(re.findall(r'(?<![\w/])(e3gnn(?:/parallel)?)(?![\w/])', text))
    return {
        'e3gnn': 'e3gnn' in styles,
        'e3gnn/parallel': 'e3gnn/parallel' in styles,
        # serial builds report "MPI v1.0: LAMMPS MPI STUBS ..."
        'mpi': 'MPI STUBS' not in text,
    }


def _usable(lmp: Union[str, Path, None], kind: str) -> bool:
    if not lmp or not os.path.isfile(lmp) or not os.access(lmp, os.X_OK):
        return False
    feats = lmp_features(lmp)
    if feats is None:
        return False
    if kind == 'mpi':
        return feats['mpi'] and feats['e3gnn/parallel']
    return feats['e3gnn']


def find_lmp(kind: str = 'serial') -> Optional[str]:
    """Absolute path of a LAMMPS binary with SevenNet's pair styles, or None.

    Looks, in order, at ``$SEVENN_MF_LMP`` (serial) / ``$SEVENN_MF_LMP_MPI``
    (mpi), the build_lammps.sh cache for the installed sevenn/torch versions,
    and ``lmp`` on PATH. A candidate counts only if ``lmp -h`` lists ``e3gnn``
    (serial) or ``e3gnn/parallel`` in an MPI build (mpi).
    """
    _check_kind(kind)
    candidates: List[str] = []
    env_path = os.environ.get(ENV_VARS[kind])
    if env_path:
        candidates.append(os.path.expanduser(env_path))
    try:
        candidates.append(str(cached_lmp_path(kind)))
    except importlib.metadata.PackageNotFoundError:
        pass
    on_path = shutil.which('lmp')
    if on_path:
        candidates.append(on_path)
    for cand in candidates:
        if _usable(cand, kind):
            return os.path.abspath(cand)
        if env_path and cand == candidates[0]:
            warnings.warn(
                f'{ENV_VARS[kind]}={env_path} is not a usable LAMMPS for '
                f'{kind} SevenNet runs (`lmp -h` must list '
                f'{"e3gnn/parallel in an MPI build" if kind == "mpi" else "e3gnn"})',
                stacklevel=2,
            )
    return None


def skip_reason(kind: str = 'serial') -> str:
    """Text for pytest.skip when find_lmp(kind) is None."""
    _check_kind(kind)
    flag = ' --mpi' if kind == 'mpi' else ''
    style = 'e3gnn/parallel (MPI build)' if kind == 'mpi' else 'e3gnn'
    return (
        f'no LAMMPS with pair_style {style} found: build it with '
        f'`bash {BUILD_SCRIPT}{flag}` (5-10 min on 2 cores; root is needed '
        'the first time for apt) or set '
        f'{ENV_VARS[kind]}=/path/to/lmp; looked for {ENV_VARS[kind]}, '
        f'{lammps_cache_dir()}/<key>/bin/lmp and `lmp` on PATH'
    )


def _mpirun_cmd(nprocs: int) -> List[str]:
    mpirun = shutil.which('mpirun') or shutil.which('mpiexec')
    if mpirun is None:
        raise LammpsError(
            f'nprocs={nprocs} needs mpirun (apt-get install openmpi-bin)'
        )
    try:
        ver = subprocess.run(
            [mpirun, '--version'],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        ver = ''
    if 'Open MPI' in ver or 'OpenRTE' in ver:
        return [
            mpirun,
            '--allow-run-as-root',
            '--oversubscribe',
            '-np',
            str(nprocs),
        ]
    return [mpirun, '-n', str(nprocs)]


def _tail(text: str, nlines: int = 40) -> str:
    return '\n'.join(text.splitlines()[-nlines:])


def run_lammps(
    lmp: Union[str, Path],
    input_text: str,
    workdir: Union[str, Path],
    nprocs: int = 1,
    timeout: float = 600,
    env: Optional[Mapping[str, str]] = None,
    extra_args: Sequence[str] = (),
) -> str:
    """Run ``input_text`` with ``lmp`` in ``workdir``; return its stdout.

    Writes ``in.lammps`` and ``log.lammps`` in ``workdir``. ``nprocs > 1``
    runs under mpirun (an MPI build is needed). OMP_NUM_THREADS defaults to 1.
    Raises LammpsError with the output tail when LAMMPS fails or times out.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'in.lammps').write_text(input_text)
    cmd = [str(lmp), '-in', 'in.lammps', '-log', 'log.lammps', *extra_args]
    if nprocs > 1:
        cmd = _mpirun_cmd(nprocs) + cmd
    run_env = _lmp_env(env)
    if nprocs > 1:
        # shared-memory transport without CMA (often blocked in containers)
        run_env.setdefault('OMPI_MCA_btl_vader_single_copy_mechanism', 'none')
    try:
        res = subprocess.run(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=run_env,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ''
        if isinstance(out, bytes):
            out = out.decode(errors='replace')
        raise LammpsError(
            f'LAMMPS timed out after {timeout} s: {" ".join(cmd)}\n'
            f'--- stdout tail ---\n{_tail(out)}'
        ) from None
    failed = res.returncode != 0 or re.search(r'^ERROR', res.stdout, re.M)
    if failed:
        log = workdir / 'log.lammps'
        log_tail = _tail(log.read_text(errors='replace')) if log.exists() else ''
        raise LammpsError(
            f'LAMMPS failed (exit {res.returncode}): {" ".join(cmd)} '
            f'in {workdir}\n--- stdout tail ---\n{_tail(res.stdout)}\n'
            f'--- stderr tail ---\n{_tail(res.stderr)}\n'
            f'--- log.lammps tail ---\n{log_tail}'
        )
    return res.stdout


def thermo_table(stdout: str) -> List[Dict[str, float]]:
    """Rows of the (last) thermo table in LAMMPS output, keyed by column."""
    rows: List[Dict[str, float]] = []
    header: Optional[List[str]] = None
    for line in stdout.splitlines():
        words = line.split()
        if words and words[0] == 'Step':
            header, rows = words, []
            continue
        if header is None:
            continue
        if line.startswith('Loop time'):
            header = None
            continue
        if len(words) == len(header):
            try:
                rows.append(dict(zip(header, map(float, words))))
            except ValueError:
                pass
    return rows
