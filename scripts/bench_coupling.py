#!/usr/bin/env python3
"""Cost of coupled fidelity heads per training step, as a ratio to the same
training without them, measured in one run (variants interleaved epoch by
epoch so that load from other jobs hits them alike).

    OMP_NUM_THREADS=1 python scripts/bench_coupling.py input_templates/ingan_methods.yaml \\
        --reps 5 --steps 16

Variants: no coupling; parameter-space only; function-space on half the
batches (fraction 0.5); function-space on every batch; both (the recipe of
the YAML if it has one). ``--radial`` adds no coupling and the YAML's recipe
with fidelity radial networks (``model.fidelity_radial: true``). The same
model, data, batch and seed for all; each epoch is ``--steps`` optimizer
steps drawn with sevenn_mf's sampler.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('input', help='methods YAML (its mf stage is timed)')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--steps', type=int, default=16)
    p.add_argument('-w', '--working-dir', default='/tmp/bench_coupling')
    p.add_argument(
        '--radial',
        action='store_true',
        help='also time fidelity radial networks (none; the YAML recipe)',
    )
    args = p.parse_args()

    from sevenn_mf.analysis.methods import read_method_input, stage_raw
    from sevenn_mf.config import config_from_dict
    from sevenn_mf.data.dataset import make_loaders, prepare_data
    from sevenn_mf.model import build_model
    from sevenn_mf.train import coupling_settings, coupling_targets, make_trainer

    mi = read_method_input(args.input)
    base = stage_raw(mi, mi.databases, best_fidelity=mi.hf_fidelity, coupling=True)
    recipe = base['train'].get('coupling') or {}
    variants = {
        'none': {},
        'parameter': {'parameter': 1.0, 'energy': 0, 'force': 0},
        'function, 0.5 of batches': {'energy': 1.0, 'force': 1.0, 'fraction': 0.5},
        'function, every batch': {'energy': 1.0, 'force': 1.0, 'fraction': 1.0},
    }
    if recipe and recipe not in variants.values():
        variants['the YAML recipe'] = recipe
    models = {name: {} for name in variants}  # model-section overrides
    if args.radial:
        for name, cpl in [('none', {}), ('the YAML recipe', recipe)]:
            variants[f'{name}, fidelity radial networks'] = cpl
            models[f'{name}, fidelity radial networks'] = {'fidelity_radial': True}
    runs = {}
    for name, cpl in variants.items():
        raw = copy.deepcopy(base)
        raw['train']['coupling'] = cpl
        raw['model'].update(models[name])
        raw['train'].pop('early_stopping', None)
        batch = int(raw['data'].get('batch_size', 8))
        raw['data']['sampling'] = {
            'mode': 'temperature',
            'temperature': 1.0,
            'epoch_length': args.steps * batch,
        }
        config = config_from_dict(raw, mi.base_dir)
        data = prepare_data(config, args.working_dir, log=lambda s: None)
        config = data.config
        settings = coupling_settings(config, data)
        copies = None
        if settings is not None and settings.function_space:
            targets, copies_of = coupling_targets(settings)
            copies = (targets, copies_of, settings.fraction)
        loader = make_loaders(data, config, copies=copies)['trainset']
        import torch

        torch.manual_seed(1)
        trainer = make_trainer(build_model(config), config, settings)
        trainer.setup_run(config, f'{args.working_dir}/{len(runs)}', 1, None)
        runs[name] = (trainer, loader)
    times = {k: [] for k in runs}
    for rep in range(args.reps + 1):  # the first round warms up
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            trainer, loader = runs[name]
            loader.set_epoch(rep)
            t0 = time.perf_counter()
            trainer.run_one_epoch(loader, is_train=True)
            if rep:
                times[name].append((time.perf_counter() - t0) / len(loader))
    ref = statistics.median(times['none'])
    print(
        f'\n{args.input}: {args.steps} steps of batch {batch}, median of {args.reps}'
    )
    print('| coupling | s/step | ratio to none |')
    print('|---|---|---|')
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f'| {name} | {med:.3f} | {med / ref:.2f} |')


if __name__ == '__main__':
    main()
