"""Errors of a checkpoint at one fidelity on labelled structures: per-structure
CSV, summary and parity plots."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from torch_geometric.loader import DataLoader

from ._sevenn import KEY
from .checkpoint import Checkpoint, PathLike
from .data.databases import read_frames, validate_frames
from .data.graphs import build_graphs
from .gap import GapRange, Gaps, head_gaps
from .metrics import EV_A3_TO_GPA
from .model import model_device, resolve_fidelity


@dataclass
class Predictions:
    """Per-structure reference and predicted values (NaN where unlabelled)."""

    where: List[str] = field(default_factory=list)
    natoms: List[int] = field(default_factory=list)
    e_ref: List[float] = field(default_factory=list)  # eV/atom
    e_pred: List[float] = field(default_factory=list)
    f_ref: List[np.ndarray] = field(default_factory=list)  # eV/Å, (n, 3)
    f_pred: List[np.ndarray] = field(default_factory=list)
    s_ref: List[np.ndarray] = field(default_factory=list)  # GPa, (6,)
    s_pred: List[np.ndarray] = field(default_factory=list)


@dataclass
class Summary:
    fidelity: Optional[str]
    n_structures: int
    errors: Dict[str, float]
    files: Dict[str, str]

    def to_text(self) -> str:
        rows = [
            f'fidelity: {self.fidelity or "(single)"}, structures: {self.n_structures}'
        ]
        for k, v in self.errors.items():
            rows.append(f'  {k:<22} {v:10.3f}')
        for k, v in self.files.items():
            rows.append(f'  {k}: {v}')
        return '\n'.join(rows)


def predict(
    checkpoint,
    graphs: Sequence,
    fidelity: Optional[str],
    batch_size: int = 8,
    model=None,
) -> Predictions:
    cp = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    fidelity = resolve_fidelity(cp.config, fidelity)
    model = model if model is not None else cp.build_model()
    model.set_is_batch_data(True)
    model.eval()
    for g in graphs:
        if fidelity is not None:
            g[KEY.DATA_MODALITY] = fidelity
    out = Predictions()
    device = model_device(model)
    for batch in DataLoader(list(graphs), batch_size=batch_size):
        res = model(batch.to(device)).cpu()
        n = res[KEY.NUM_ATOMS].reshape(-1).detach().numpy().astype(int)
        e_ref = res[KEY.ENERGY].reshape(-1).detach().numpy() / n
        e_pred = res[KEY.PRED_TOTAL_ENERGY].reshape(-1).detach().numpy() / n
        bidx = res[KEY.BATCH].numpy()
        f_ref = res[KEY.FORCE].detach().numpy()
        f_pred = res[KEY.PRED_FORCE].detach().numpy()
        s_ref = res[KEY.STRESS].detach().numpy().reshape(-1, 6) * EV_A3_TO_GPA
        s_pred = res[KEY.PRED_STRESS].detach().numpy().reshape(-1, 6) * EV_A3_TO_GPA
        infos = res[KEY.INFO] if KEY.INFO in res else [{}] * len(n)
        for i in range(len(n)):
            if isinstance(infos, dict):  # PyG batches info dicts key by key
                info = {k: v[i] for k, v in infos.items()}
            else:
                info = infos[i] if isinstance(infos, list) else {}
            out.where.append(f'{info.get("file", "?")}:{info.get("frame", i)}')
            out.natoms.append(int(n[i]))
            out.e_ref.append(float(e_ref[i]))
            out.e_pred.append(float(e_pred[i]))
            out.f_ref.append(f_ref[bidx == i])
            out.f_pred.append(f_pred[bidx == i])
            out.s_ref.append(s_ref[i])
            out.s_pred.append(s_pred[i])
    return out


def error_summary(p: Predictions) -> Dict[str, float]:
    def stats(ref, pred, scale):
        ref, pred = np.asarray(ref, float).ravel(), np.asarray(pred, float).ravel()
        ok = np.isfinite(ref)
        if not ok.any():
            return float('nan'), float('nan')
        d = (pred[ok] - ref[ok]) * scale
        return float(np.abs(d).mean()), float(np.sqrt((d * d).mean()))

    e = stats(p.e_ref, p.e_pred, 1000.0)
    f = stats(
        np.concatenate(p.f_ref) if p.f_ref else [],
        np.concatenate(p.f_pred) if p.f_pred else [],
        1000.0,
    )
    s = stats(
        np.concatenate(p.s_ref) if p.s_ref else [],
        np.concatenate(p.s_pred) if p.s_pred else [],
        1.0,
    )
    return {
        'energy MAE (meV/atom)': e[0],
        'energy RMSE (meV/atom)': e[1],
        'force MAE (meV/Å)': f[0],
        'force RMSE (meV/Å)': f[1],
        'stress MAE (GPa)': s[0],
        'stress RMSE (GPa)': s[1],
    }


def parity_plot(p: Predictions, path: str, title: str = '') -> str:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [
        ('energy (eV/atom)', p.e_ref, p.e_pred),
        (
            'force (eV/Å)',
            np.concatenate(p.f_ref).ravel(),
            np.concatenate(p.f_pred).ravel(),
        ),
        (
            'stress (GPa)',
            np.concatenate(p.s_ref).ravel(),
            np.concatenate(p.s_pred).ravel(),
        ),
    ]
    panels = [(n, np.asarray(r, float), np.asarray(q, float)) for n, r, q in panels]
    panels = [(n, r[np.isfinite(r)], q[np.isfinite(r)]) for n, r, q in panels]
    panels = [x for x in panels if len(x[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    axes = np.atleast_1d(axes)
    for ax, (name, ref, pred) in zip(axes, panels):
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8)
        ax.scatter(ref, pred, s=6, alpha=0.6)
        mae = np.abs(pred - ref).mean()
        ax.set_title(f'{name}\nMAE {mae:.4g}')
        ax.set_xlabel('reference')
        ax.set_ylabel('predicted')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(
    checkpoint: PathLike,
    files: Sequence[str],
    fidelity: Optional[str] = None,
    out_dir: str = 'evaluation',
    batch_size: int = 8,
) -> Summary:
    cp = Checkpoint(checkpoint)
    fidelity = resolve_fidelity(cp.config, fidelity)
    frames = []
    for f in files:
        frames += read_frames(f)
    validate_frames(frames, species=cp.species)
    graphs = build_graphs(
        frames, cp.cutoff, fidelity or 'default', 1.0, desc='evaluate'
    )
    model = cp.build_model()
    p = predict(cp, graphs, fidelity, batch_size, model=model)
    gaps = (
        head_gaps(
            model, cp.config, graphs, reference=fidelity, batch_size=batch_size
        )
        if len(cp.fidelities) > 1
        else None
    )
    ranges = GapRange.from_dict(cp.gap_range)
    if ranges is not None and ranges.reference != fidelity:
        ranges = None  # the stored range is of another head
    os.makedirs(out_dir, exist_ok=True)
    per = os.path.join(out_dir, 'per_structure.csv')
    with open(per, 'w', newline='') as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                'structure',
                'natoms',
                'energy_ref_eV_atom',
                'energy_pred_eV_atom',
                'energy_err_meV_atom',
                'force_mae_meV_A',
            ]
            + _gap_header(gaps, ranges)
        )
        for i in range(len(p.where)):
            fr, fp = p.f_ref[i], p.f_pred[i]
            ok = np.isfinite(fr)
            fmae = (
                float(np.abs(fp[ok] - fr[ok]).mean() * 1000)
                if ok.any()
                else float('nan')
            )
            w.writerow(
                [
                    p.where[i],
                    p.natoms[i],
                    f'{p.e_ref[i]:.6f}',
                    f'{p.e_pred[i]:.6f}',
                    f'{(p.e_pred[i] - p.e_ref[i]) * 1000:.3f}',
                    f'{fmae:.3f}',
                ]
                + _gap_cells(gaps, ranges, i)
            )
    errors = error_summary(p)
    if gaps is not None:
        errors.update(_gap_summary(gaps, ranges))
    summ = os.path.join(out_dir, 'summary.csv')
    with open(summ, 'w', newline='') as fh:
        w = csv.writer(fh)
        w.writerow(['metric', 'value'])
        for k, v in errors.items():
            w.writerow([k, f'{v:.6g}'])
    png = parity_plot(
        p,
        os.path.join(out_dir, 'parity.png'),
        title=f'{os.path.basename(cp.path)} @ {fidelity or "single"}',
    )
    return Summary(
        fidelity,
        len(p.where),
        errors,
        {'per-structure': per, 'summary': summ, 'parity plot': png},
    )


# ---- the fidelity gap of each structure ------------------------------------------
def _gap_header(gaps: Optional[Gaps], ranges: Optional[GapRange]) -> List[str]:
    if gaps is None:
        return []
    cols = []
    for other in gaps.energy:
        cols += [f'gap_{other}_energy_meV_atom', f'gap_{other}_force_meV_A']
    return cols + (['outside_training_gap_range'] if ranges is not None else [])


def _gap_cells(
    gaps: Optional[Gaps], ranges: Optional[GapRange], i: int
) -> List[str]:
    if gaps is None:
        return []
    cells = []
    for other in gaps.energy:
        cells += [
            f'{1000 * gaps.energy[other][i]:.3f}',
            f'{1000 * gaps.force[other][i]:.3f}',
        ]
    if ranges is not None:
        cells.append(str(_outside(gaps, ranges, i)).lower())
    return cells


def _outside(gaps: Gaps, ranges: GapRange, i: int) -> bool:
    return any(
        ranges.outside(o, float(gaps.energy[o][i]), float(gaps.force[o][i]))
        for o in gaps.energy
    )


def _gap_summary(gaps: Gaps, ranges: Optional[GapRange]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for other, e in gaps.energy.items():
        out[f'gap to {other}: energy mean (meV/atom)'] = 1000 * float(e.mean())
        out[f'gap to {other}: energy sd (meV/atom)'] = 1000 * float(e.std())
        out[f'gap to {other}: force mean (meV/Å)'] = 1000 * float(
            np.nanmean(gaps.force[other])
        )
    if ranges is not None:
        n = len(next(iter(gaps.energy.values())))
        out['outside the training gap range (structures)'] = float(
            sum(_outside(gaps, ranges, i) for i in range(n))
        )
    return out
