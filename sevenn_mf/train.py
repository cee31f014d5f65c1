"""Multi-fidelity training through sevenn's own Trainer and epoch loop.

The flow: config -> :func:`sevenn_mf.data.dataset.prepare_data` (databases,
graphs, per-fidelity references: the data layer) -> sevenn's builder (with
our layers) -> ``MFTrainer`` (a sevenn ``Trainer`` subclass) ->
``sevenn.scripts.processing_epoch.processing_epoch_v2``. This module holds
what trains: the trainer subclass, DDP set-up, checkpoints and the run loop.

``MFTrainer`` adds, by overriding a few Trainer methods, what the epoch loop
lacks: atomic checkpoints, a ``checkpoint_last.pth`` every epoch for resuming,
a best checkpoint chosen on a target fidelity that survives a resume, a
deterministic per-epoch order, and per-database / per-fidelity metrics in the
units people quote (meV/atom, meV/Å, GPa) in a CSV.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import sys
import warnings
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from sevenn.logger import Logger
from sevenn.scripts.processing_epoch import processing_epoch_v2
from sevenn.train.trainer import Trainer

from . import _sevenn as S
from . import finetune
from ._sevenn import KEY
from .checkpoint import atomic_torch_save, read_training_state, remove_stale_saves
from .config import check_config
from .coupling import (
    CouplingError,
    CouplingLoss,
    CouplingSettings,
    CouplingWarning,
    coupling_targets,
    inert_warning,
    settings_from,
)
from .data.dataset import TrainingData, concat, make_loaders, prepare_data
from .data.sampler import DatabaseSampler
from .ema import WeightAverage, check_decay
from .gap import (
    GapRange,
    Gaps,
    gap_columns,
    gap_reference,
    head_gaps,
    summarize_gaps,
)
from .metrics import FidelityMetrics
from .model import build_model, fidelity_parameter_names
from .resume import check_resume, fingerprint

LAST = 'checkpoint_last.pth'
BEST = 'checkpoint_best.pth'
_NUMBERED = re.compile(r'checkpoint_(\d+)\.pth$')


# ---- trainer ----------------------------------------------------------------------
class MFTrainer(Trainer):
    """sevenn's Trainer with resumable, atomic checkpoints and fidelity metrics."""

    # train.ema_decay: the averaged weights are validated and checkpointed
    ema: Optional[WeightAverage] = None

    def setup_run(
        self,
        config: Dict[str, Any],
        working_dir: str,
        start_epoch: int,
        best_loader: Optional[str],
        best_value: float = math.inf,
        data: Optional[TrainingData] = None,
        state: Optional[Dict[str, Any]] = None,
        run_fingerprint: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``state``: the ``sevenn_mf`` entry of the checkpoint a resumed run
        continues (best value, early-stopping counter)."""
        state = state or {}
        self.config = config
        self.working_dir = os.path.abspath(working_dir)
        self.epoch = start_epoch
        self.best_loader = best_loader
        self.best_metric = config.get(KEY.BEST_METRIC, 'TotalLoss')
        self.best_value = float(state.get('best_value', best_value))
        self._epoch_best_candidate = math.inf
        self.user_per_epoch = int(config.get(KEY.PER_EPOCH, 10) or 10)
        self.early = early_stopping_settings(config, best_loader)
        self.epochs_since_best = int(state.get('epochs_since_best', 0))
        self.monitor_best = float(state.get('monitor_best', math.inf))
        self._epoch_monitor = math.inf
        self.stopped = bool(state.get('stopped_early', False))
        self.fingerprint = run_fingerprint
        self.gap_sets, self.gap_train = _gap_sets(config, data)
        self.gap_range: Optional[Dict[str, Any]] = state.get('gap_range')
        self.metrics = FidelityMetrics(gap_columns(config) if self.gap_sets else ())
        self.metrics_csv = os.path.join(self.working_dir, 'metrics.csv')
        if self.rank == 0:
            self.metrics.truncate_csv(self.metrics_csv, start_epoch)
        self.progress = sys.stderr.isatty() and self.rank == 0

    def enable_ddp(self) -> None:
        """Data parallel over the initialised process group (gloo on CPU,
        nccl on GPU). sevenn's Trainer wraps DDP itself only for nccl/mpi, so
        the trainer is built non-distributed and wrapped here; the optimizer
        already holds the same Parameter objects."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        kwargs = {}
        if self.device.type == 'cuda':
            kwargs['device_ids'] = [self.device]
        # buffers are constants (shift/scale, cutoffs): synced once at init,
        # not before every forward
        if 'forward_sync_buffers' in inspect.signature(DDP).parameters:
            kwargs['forward_sync_buffers'] = False
        else:
            kwargs['broadcast_buffers'] = False
        self.model = DDP(self.model, **kwargs)
        self.model.module.set_is_batch_data(True)
        self.distributed = True
        self.rank = torch.distributed.get_rank()

    # one call per loader per epoch (processing_epoch_v2)
    def run_one_epoch(
        self,
        loader: Iterable,
        is_train: bool = False,
        error_recorder=None,
        memory_error_recorder=None,
        wrap_tqdm=False,
    ) -> None:
        name = getattr(loader, 'name', 'trainset' if is_train else 'validset')
        if self.ema is not None:
            # validation, the gap monitor and the checkpoints that follow see
            # the averaged weights; training continues from the raw ones
            if is_train:
                self.ema.load_raw()
            else:
                self.ema.load_average()
        if is_train:
            if hasattr(loader, 'set_epoch'):
                loader.set_epoch(self.epoch)
            elif hasattr(getattr(loader, 'sampler', None), 'set_epoch'):
                loader.sampler.set_epoch(self.epoch)
        acc = self.metrics.recorder(name)
        tee = _Tee(error_recorder, acc)
        bar = len(loader) if (self.progress and is_train) else False
        if self.distributed:
            self._run_one_epoch_ddp(
                loader, is_train, tee, memory_error_recorder, bar
            )
            if error_recorder is not None:
                self.recorder_all_reduce(error_recorder)
            acc.all_reduce(self.device)
        else:
            super().run_one_epoch(
                loader, is_train, tee, memory_error_recorder, wrap_tqdm=bar
            )
        if error_recorder is not None and name in (
            self.best_loader,
            self.early and self.early[2],
        ):
            cur = error_recorder.get_current()
            if self.best_metric in cur:
                value = float(cur[self.best_metric]['value'])
                if name == self.best_loader:
                    self._epoch_best_candidate = value
                if self.early and name == self.early[2]:
                    self._epoch_monitor = value

    def _run_one_epoch_ddp(self, loader, is_train, tee, memory_error_recorder, bar):
        # Shards may differ by one structure, so ranks may run a different
        # number of steps: training runs inside DDP's join (a rank that ran
        # out shadows the gradient all-reduces of the others), evaluation on
        # the bare module (no collectives at all). sevenn's end-of-epoch
        # recorder all-reduce is done by the caller, after the join.
        ddp = self.model
        self.distributed = False
        try:
            if is_train:
                with ddp.join(divide_by_initial_world_size=False):
                    super().run_one_epoch(
                        loader, True, tee, memory_error_recorder, wrap_tqdm=bar
                    )
                if _uneven_steps(loader):
                    self._sync_from_rank0()
            else:
                self.model = ddp.module
                super().run_one_epoch(
                    loader, False, tee, memory_error_recorder, wrap_tqdm=bar
                )
        finally:
            self.model = ddp
            self.distributed = True

    def _sync_from_rank0(self) -> None:
        """After an epoch in which rank 0 (which always has the largest shard)
        took steps the others did not, give every rank its parameters (DDP's
        join already broadcasts them) and optimizer state."""
        import torch.distributed as dist

        for t in self.model.module.state_dict().values():
            dist.broadcast(t, src=0)
        if self.ema is not None:  # rank 0's extra steps also moved its average
            self.ema.broadcast_from(0)
        state = [self.optimizer.state_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(state, src=0)
        if self.rank != 0:
            self.optimizer.load_state_dict(state[0])

    # called once per epoch, after all loaders
    def scheduler_step(self, metric: Optional[float] = None) -> None:
        log = Logger()
        self._gap_monitor(log)
        log.write(self.metrics.table(self.epoch))
        coupling = self.coupling_loss
        if coupling is not None:
            means = coupling.epoch_means()
            log.writeline(
                'coupling penalties (mean per step, before weights): '
                + ', '.join(f'{k} {v:.4g}' for k, v in means.items())
            )
        lr = self.get_lr()  # of the epoch that just ran
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # this epoch's monitored loss (sevenn passes the best before it,
            # which it also forgets on resume)
            metric = float(
                self._epoch_monitor if self.early else self._epoch_best_candidate
            )
        super().scheduler_step(metric)
        self._early_stopping_step(log)
        if self.rank == 0:
            self.metrics.write_epoch(self.metrics_csv, self.epoch, lr)
        else:
            self.metrics.reset()
        self.epoch += 1

    @property
    def coupling_loss(self) -> Optional[CouplingLoss]:
        for loss_def, _ in self.loss_functions:
            if isinstance(loss_def, CouplingLoss):
                return loss_def
        return None

    def _bare_model(self):
        return getattr(self.model, 'module', self.model)

    def _gap_monitor(self, log) -> None:
        """The gap of the reference head to every other head on each
        validation set (metrics.csv gap_* columns and a log table)."""
        if not self.gap_sets:
            return
        per_set: Dict[str, Gaps] = {}
        for name, graphs in self.gap_sets.items():
            if self.distributed:
                r, w = self.rank, torch.distributed.get_world_size()
                graphs = graphs[r::w]
            gaps = head_gaps(
                self._bare_model(),
                self.config,
                graphs,
                batch_size=int(self.config[KEY.BATCH_SIZE]),
            )
            if self.distributed:
                gaps = _all_gather_gaps(gaps)
            if gaps is not None:
                per_set[name] = gaps
        if not per_set:
            return
        merged = _merge_gaps(list(per_set.values()))
        rows = (
            {'validset': summarize_gaps(merged)}
            if 'validset' in self.metrics.acc
            else {}
        )
        rows.update({n: summarize_gaps(g) for n, g in per_set.items()})
        self.metrics.extra.update(rows)
        ref = merged.reference
        lines = [
            f'fidelity gap of the {ref} head (per-atom energy beyond element '
            'references: mean / sd in meV/atom; force: mean |dF| in meV/Å)'
        ]
        for name, row in rows.items():
            cells = []
            for other in merged.energy:
                cells.append(
                    f'to {other}: {row[f"gap_{other}_energy_mean"]:8.2f} / '
                    f'{row[f"gap_{other}_energy_sd"]:7.2f}, '
                    f'force {row[f"gap_{other}_force_mean"]:7.1f}'
                )
            lines.append(f'  {name:<26}' + '   '.join(cells))
        log.writeline('\n'.join(lines))

    def _early_stopping_step(self, log) -> None:
        if self.early is None:
            return
        patience, min_delta, monitor = self.early
        if self._epoch_monitor < self.monitor_best * (1.0 - min_delta):
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1
        self.monitor_best = min(self.monitor_best, self._epoch_monitor)
        if self.epochs_since_best >= patience:
            self.stopped = True
            log.writeline(
                f'early stopping: {monitor} {self.best_metric} has not '
                f'improved by more than {100 * min_delta:g} % for {patience} epochs'
            )

    def _range_on_training(self) -> Optional[Dict[str, Any]]:
        if not self.gap_train:
            return None
        gaps = head_gaps(
            self._bare_model(),
            self.config,
            self.gap_train,
            batch_size=int(self.config[KEY.BATCH_SIZE]),
        )
        return GapRange.from_gaps(gaps).to_dict() if gaps is not None else None

    def write_checkpoint(self, path: str, **extra) -> None:
        base = os.path.basename(path)
        epoch = int(extra.get('epoch', 0))
        total = int(self.config.get(KEY.EPOCH, epoch))
        final = epoch == total or self.stopped
        if base == BEST:
            if not self._epoch_best_candidate < self.best_value:
                return  # sevenn's loop forgets the best value on resume; we don't
            self.best_value = self._epoch_best_candidate
        if self.distributed and self.rank != 0:
            if _NUMBERED.search(base) and self.stopped:
                raise _EarlyStop
            return
        m = _NUMBERED.search(base)
        if base == BEST or (m and final and epoch > 0):
            self.gap_range = self._range_on_training()
        cp = self.get_checkpoint_dict()
        cp.update(extra)
        cp['sevenn_mf'] = {
            'best_value': self.best_value,
            'best_loader': self.best_loader,
            'epochs_since_best': self.epochs_since_best,
            'monitor_best': self.monitor_best,
            'stopped_early': self.stopped,
            'run': self.fingerprint,
            'gap_range': self.gap_range,
        }
        if self.ema is not None:
            cp['sevenn_mf']['ema'] = self.ema.state_dict()
        d = os.path.dirname(path)
        if m:
            # epoch 0 has nothing to resume: a start that fails blocks no rerun
            if epoch > 0:
                atomic_torch_save(cp, os.path.join(d, LAST))
            if epoch > 0 and (epoch % self.user_per_epoch == 0 or final):
                atomic_torch_save(cp, path)
            if self.stopped:
                raise _EarlyStop
            return
        atomic_torch_save(cp, path)


class _EarlyStop(Exception):
    """Raised after the last checkpoint of an early-stopped run is written
    (sevenn's epoch loop has no way out)."""


def early_stopping_settings(
    config: Dict[str, Any], best_loader: Optional[str]
) -> Optional[Tuple[int, float, str]]:
    """(patience, min_delta, monitored loader) of ``train.early_stopping``
    (None: off): the run stops after ``patience`` epochs in which the
    monitored validation loss did not fall below ``(1 - min_delta)`` times
    its best value so far (``min_delta`` is a relative improvement, default
    0: any improvement counts). ``monitor: all`` (default) watches the loss
    on every validation structure (all fidelities: a model has converged when
    none of its heads still improves), ``monitor: best`` the one that picks
    checkpoint_best.pth (``train.best_fidelity``'s). With
    ``reducelronplateau`` the monitored loss also drives the learning rate."""
    raw = config.get(S.EARLY_STOPPING) or {}
    if not raw:
        return None
    if not isinstance(raw, dict) or set(raw) - {'patience', 'min_delta', 'monitor'}:
        raise ValueError(
            'train.early_stopping takes {patience: epochs, min_delta: relative gain, '
            f'monitor: all | best}}, got {raw!r}'
        )
    monitor = raw.get('monitor', 'all')
    if monitor not in ('all', 'best'):
        raise ValueError(
            f"train.early_stopping.monitor must be 'all' or 'best', got {monitor!r}"
        )
    patience = raw.get('patience')
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ValueError(
            f'train.early_stopping.patience must be an integer >= 1, got {patience!r}'
        )
    min_delta = raw.get('min_delta', 0.0)
    if not isinstance(min_delta, (int, float)) or not 0 <= min_delta < 1:
        raise ValueError(
            'train.early_stopping.min_delta (a relative gain) must be in [0, 1), '
            f'got {min_delta!r}'
        )
    if best_loader is None:
        raise ValueError(
            'train.early_stopping needs validation data (a validation split of a '
            'database) to monitor'
        )
    return (
        patience,
        float(min_delta),
        'validset' if monitor == 'all' else best_loader,
    )


# at most this many structures per set for the gap monitor and the range
_GAP_MAX = 1000


def _evenly(graphs, n: int = _GAP_MAX) -> List[Any]:
    m = len(graphs)
    if m <= n:
        return [graphs[i] for i in range(m)]
    return [graphs[int(i)] for i in np.linspace(0, m - 1, n).round()]


def _gap_sets(config, data: Optional[TrainingData]):
    """({per-fidelity validation set: graphs}, reference head's training
    graphs) for the gap monitor and the range stored in checkpoints."""
    ref = gap_reference(config)
    if data is None or ref is None:
        return {}, []
    sets = {
        name: _evenly(graphs)
        for name, graphs in data.valid_sets().items()
        if name.endswith('_validset')
        and not name.endswith('_db_validset')
        and name[: -len('_validset')] in config[S.FIDELITIES]
    }
    train_ref = [db.train for db in data.databases if db.spec.fidelity == ref]
    train_graphs = _evenly(concat(train_ref)) if train_ref else []
    return sets, train_graphs


def _all_gather_gaps(gaps: Optional[Gaps]) -> Optional[Gaps]:
    import torch.distributed as dist

    parts: List[Optional[Gaps]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, gaps)
    parts = [p for p in parts if p is not None]
    return _merge_gaps(parts) if parts else None


def _merge_gaps(parts: List[Gaps]) -> Gaps:
    others = list(parts[0].energy)
    return Gaps(
        parts[0].reference,
        {o: np.concatenate([p.energy[o] for p in parts]) for o in others},
        {o: np.concatenate([p.force[o] for p in parts]) for o in others},
    )


def _uneven_steps(loader) -> bool:
    """Whether the ranks run different numbers of training steps this epoch
    (the same answer on every rank: it depends only on the sampler)."""
    sampler = getattr(loader, 'sampler', None)
    batch = getattr(loader, 'batch_size', None)
    if not isinstance(sampler, DatabaseSampler) or not batch:
        return False
    if sampler.mode != 'proportional':
        return False  # padded: equal steps by construction
    steps = {
        math.ceil(len(range(r, sampler.epoch_length, sampler.num_replicas)) / batch)
        for r in range(sampler.num_replicas)
    }
    return len(steps) > 1


def make_trainer(
    model: torch.nn.Module,
    config: Dict[str, Any],
    coupling: Optional[CouplingSettings] = None,
) -> MFTrainer:
    # Trainer.from_config is a staticmethod that instantiates Trainer itself;
    # re-classing its result keeps sevenn's config->arguments mapping in one place
    trainer = Trainer.from_config(model, {**config, KEY.IS_DDP: False})
    trainer.__class__ = MFTrainer
    if coupling is not None:
        # the same criterion as sevenn's energy term (e.g. Huber with its delta)
        criterion = trainer.loss_functions[0][0].criterion
        trainer.loss_functions.append(
            (CouplingLoss(coupling, config, criterion), 1.0)
        )
    if config.get(KEY.IS_DDP, False):
        trainer.enable_ddp()
    return trainer


# ---- distributed ------------------------------------------------------------------
def init_distributed(config: Dict[str, Any]) -> Tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) or with
    ``config['is_ddp']`` (``--distributed``), joins the process group: gloo
    on CPU, nccl on GPU (one device per local rank)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if not config.get(KEY.IS_DDP, False) and world <= 1:
        config[KEY.IS_DDP] = False
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if 'RANK' not in os.environ:
            raise ValueError(
                'distributed training needs a launcher that sets RANK, '
                'WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun)'
            )
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        device = str(config.get(KEY.DEVICE, 'auto'))
        cuda = torch.cuda.is_available() and not device.startswith('cpu')
        if cuda:
            torch.cuda.set_device(local_rank)
            config[KEY.DEVICE] = f'cuda:{local_rank}'
        else:
            config[KEY.DEVICE] = 'cpu'
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
    config[KEY.IS_DDP] = True
    config[KEY.DDP_BACKEND] = str(dist.get_backend())
    return dist.get_rank(), dist.get_world_size()


def _prepare_data_once(
    config, working_dir, log, rank: int, world: int
) -> TrainingData:
    """Rank 0 reads the data and builds graph caches / stores; the other
    ranks then load them (no concurrent builds). A data error on rank 0
    stops every rank."""
    if world == 1:
        return prepare_data(config, working_dir, log=log)
    import torch.distributed as dist

    if rank != 0:
        msg = [None]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise ValueError(f'rank 0 could not prepare the data: {msg[0]}')
        return prepare_data(config, working_dir, log=log)
    try:
        data = prepare_data(config, working_dir, log=log)
    except Exception as exc:
        dist.broadcast_object_list([f'{type(exc).__name__}: {exc}'], src=0)
        raise
    dist.broadcast_object_list([None], src=0)
    return data


def freeze_shared(model: torch.nn.Module) -> List[str]:
    """Leave only fidelity-dependent parameters and the per-fidelity energy
    references trainable (the references train even without
    ``train_shift_scale``). In onehot mode the fidelity layers' weight tensors
    also hold shared paths: :func:`sevenn_mf.finetune.configure_optimizer`
    keeps those entries fixed."""
    keep = set(fidelity_parameter_names(model))
    frozen = []
    for n, p in model.named_parameters():
        if n not in keep and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(n)
    shift = 'rescale_atomic_energy.shift'
    if shift in keep:
        model.get_parameter(shift).requires_grad_(True)
    return frozen


class _Tee:
    """Feeds sevenn's ErrorRecorder and our metric accumulator the same output."""

    def __init__(self, *recorders) -> None:
        self.recorders = [r for r in recorders if r is not None]

    def update(self, output, *args, **kwargs) -> None:
        for r in self.recorders:
            r.update(output, *args, **kwargs)

    def __getattr__(self, item):
        return getattr(self.recorders[0], item)


# ---- driver -----------------------------------------------------------------------
def _best_loader(config: Dict[str, Any], loaders: Dict[str, Any]) -> Optional[str]:
    target = config.get(S.BEST_FIDELITY)
    if target:
        if target not in config[S.FIDELITIES]:
            raise ValueError(
                f"train.best_fidelity '{target}' is not a fidelity "
                f'({", ".join(config[S.FIDELITIES])})'
            )
        name = f'{target}_validset'
        if name not in loaders:
            raise ValueError(
                f"train.best_fidelity '{target}' has no validation data"
            )
        return name
    return 'validset' if 'validset' in loaders else None


def _logger_for(path: str, screen: bool, rank: int) -> Logger:
    """sevenn's Logger is a process-wide singleton that keeps the file and screen
    flag of its first construction; point it at this run's file, so a second
    training in the same process (learning curves, tests) logs where it runs."""
    logger = Logger(filename=path, screen=screen, rank=rank)
    if rank == 0 and logger.logfile is None:
        logger.switch_file(path)
        logger.screen = bool(screen)
    return logger


def train(
    config: Dict[str, Any],
    working_dir: str,
    resume: bool = False,
    screen: bool = True,
) -> str:
    """Train; returns the path of the best (or last) checkpoint."""
    check_config(config, training=True)  # before anything is read or written
    working_dir = os.path.abspath(working_dir)
    os.makedirs(working_dir, exist_ok=True)
    last = os.path.join(working_dir, LAST)
    if resume and not os.path.isfile(last):
        raise FileNotFoundError(f'--resume: no {LAST} in {working_dir}')
    if not resume and os.path.isfile(last):
        raise FileExistsError(
            f'{working_dir} already holds a run ({LAST}); use --resume to continue '
            'it or choose another working directory'
        )
    resumed = None
    if resume:
        resumed = read_training_state(last)  # one clear error for a broken file
        check_resume((resumed.get('sevenn_mf') or {}).get('run'), config, last)
        remove_stale_saves(working_dir)  # a kill mid-write left them
    check_options(config)
    run_fingerprint = fingerprint(config)
    seed = int(config.get(KEY.RANDOM_SEED, 1))
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = dict(config)
    rank, world = init_distributed(config)

    with _logger_for(
        os.path.join(working_dir, 'log.sevenn_mf'), screen, rank
    ) as logger:
        logger.greeting()
        pretrained = None
        if config.get(
            S.PRETRAINED
        ):  # fine-tuning: the model comes from a checkpoint
            pretrained = finetune.load_pretrained(config, log=logger.writeline)
            config = pretrained[1]
        data = _prepare_data_once(config, working_dir, logger.writeline, rank, world)
        config = data.config
        config.setdefault(KEY.IS_DDP, False)
        couple = coupling_settings(config, data)
        copies = None
        if couple is not None:
            logger.writeline(couple.describe())
            if couple.function_space:
                targets, copies_of = coupling_targets(couple)
                copies = (targets, copies_of, couple.fraction)
        loaders = make_loaders(
            data, config, rank=rank, world_size=world, copies=copies
        )
        logger.writeline(_data_summary(data))
        logger.writeline(data.label_summary())
        if world > 1:
            logger.writeline(
                f'distributed data parallel: {world} processes '
                f'({config[KEY.DDP_BACKEND]}), per-rank batch '
                f'{config[KEY.BATCH_SIZE]}, global batch '
                f'{world * int(config[KEY.BATCH_SIZE])}'
            )

        if pretrained is not None:
            model = finetune.finetune_model(
                pretrained[0], config, data, pretrained[2], log=logger.writeline
            )
        else:
            model = build_model(config)
        if config.get(S.FREEZE_SHARED):
            frozen = freeze_shared(model)
            logger.writeline(f'frozen shared parameters: {len(frozen)} tensors')
        if couple is not None and couple.fitted_scale:
            config = finetune.fit_scale(
                model,
                config,
                data,
                couple.fidelities,
                log=logger.writeline,
                anchor=couple.anchor,
            )
        if couple is not None and (inert := inert_warning(couple, model)):
            warnings.warn(inert, CouplingWarning, stacklevel=1)
        trainer = make_trainer(model, config, couple)
        finetune.configure_optimizer(trainer, config, log=logger.writeline)
        if float(config.get(S.EMA_DECAY) or 0.0) > 0.0:
            # after the optimizer's own step hooks (frozen entries restored
            # before they are averaged)
            trainer.ema = WeightAverage(
                model, trainer.optimizer, float(config[S.EMA_DECAY])
            )
            logger.writeline(
                f'weight average (ema_decay {config[S.EMA_DECAY]:g}): validation, '
                'early stopping and checkpoints use the averaged weights'
            )
        logger.print_model_info(model, config)

        start_epoch, state = 1, {}
        if resumed is not None:
            cp = resumed
            trainer.load_state_dicts(
                cp['model_state_dict'],
                cp['optimizer_state_dict'],
                cp['scheduler_state_dict'],
                strict=True,
            )
            start_epoch = int(cp['epoch']) + 1
            state = dict(cp.get('sevenn_mf') or {})
            if trainer.ema is not None:
                if state.get('ema') is None:
                    raise ValueError(
                        f'{last} was written without train.ema_decay: resume '
                        'it without ema_decay, or start a new run'
                    )
                trainer.ema.load_state_dict(state['ema'])
            logger.writeline(f'resuming from epoch {cp["epoch"]} ({last})')
        best_loader = _best_loader(config, loaders)
        trainer.setup_run(
            config,
            working_dir,
            start_epoch,
            best_loader,
            data=data,
            state=state,
            run_fingerprint=run_fingerprint,
        )
        total = int(config[KEY.EPOCH])
        if trainer.stopped:
            logger.writeline('this run stopped early before: nothing to do')
        elif start_epoch <= total:
            try:
                processing_epoch_v2(
                    config,
                    trainer,
                    loaders,
                    start_epoch=start_epoch,
                    best_metric_loader_key=best_loader or 'validset',
                    per_epoch=1,
                    working_dir=working_dir,
                )
            except _EarlyStop:
                logger.writeline(f'stopped early after epoch {trainer.epoch - 1}')
    if world > 1:
        # rank 0's checkpoints are complete. The process group is left to
        # process exit: destroying it (gloo, torch 2.13) now and then left a
        # rank hanging afterwards (1 run in ~15; 0 in 40 without).
        torch.distributed.barrier()
    best = os.path.join(working_dir, BEST)
    return best if os.path.isfile(best) else last


def check_options(config: Dict[str, Any]) -> None:
    """Options of this module checked before any data is read."""
    from .coupling import check_options as check_coupling

    fids = list(config.get(S.FIDELITIES) or []) or sorted(
        {
            db.get('fidelity')
            for db in config.get(S.DATABASES) or []
            if isinstance(db, dict)
        }
        - {None}
    )
    check_coupling(config.get(S.COUPLING), fids)
    raw = config.get(S.COUPLING)
    if isinstance(raw, dict) and raw.get('scale') == 'fitted':
        if not config.get(S.PRETRAINED):
            raise CouplingError(
                "train.coupling.scale: fitted fits each coupled head's energy "
                'scale to its labels against that head at the start, so it '
                'needs a trained start: train.pretrained (fine-tuning), or with '
                '--method mf, train.mf: {init: lf}'
            )
    check_decay(config.get(S.EMA_DECAY) or 0.0)
    if config.get(S.EARLY_STOPPING):
        early_stopping_settings(config, best_loader='(checked later)')


def coupling_settings(
    config: Dict[str, Any], data: TrainingData
) -> Optional[CouplingSettings]:
    counts: Dict[str, int] = {}
    for db in data.databases:
        counts[db.spec.fidelity] = counts.get(db.spec.fidelity, 0) + len(db.train)
    return settings_from(config.get(S.COUPLING), data.fidelities, counts)


def _data_summary(data: TrainingData) -> str:
    rows = ['databases:']
    for db in data.databases:
        rows.append(
            f'  {db.spec.name:<24} fidelity {db.spec.fidelity:<10} '
            f'train {len(db.train):>6}  valid {len(db.valid):>6}'
        )
    return '\n'.join(rows)
