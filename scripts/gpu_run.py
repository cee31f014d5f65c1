#!/usr/bin/env python3
"""Run a sevenn_mf script or command with every training on the GPU, without
changing any stage's fingerprint.

``train.device`` is part of a stage's config, so setting it in the YAML makes
every stage new: the PBE-only stages trained on the CPU would be trained
again. This sets the device after the fingerprint is taken, at the start of
each training. Used for round 8 of docs/benchmarks.md:

    python scripts/gpu_run.py scripts/select_coupling.py scripts/ingan_surrogate.yaml ...
    python scripts/gpu_run.py -m sevenn_mf.cli learning-curve \
        input_templates/ingan_learning_curve.yaml ...
"""

import runpy
import sys

import sevenn_mf.train as _train

_original = _train.train


def _on_gpu(config, *args, **kwargs):
    config['device'] = 'cuda'
    return _original(config, *args, **kwargs)


def main() -> None:
    _train.train = _on_gpu
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    if args[0] == '-m':
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name='__main__', alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name='__main__')


if __name__ == '__main__':
    main()
