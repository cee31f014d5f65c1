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
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from sevenn.logger import Logger
from sevenn.scripts.processing_epoch import processing_epoch_v2
from sevenn.train.trainer import Trainer

from . import _sevenn as S
from . import finetune
from ._sevenn import KEY
from .checkpoint import atomic_torch_save
from .data.dataset import TrainingData, make_loaders, prepare_data
from .data.sampler import DatabaseSampler
from .metrics import FidelityMetrics
from .model import build_model, fidelity_parameter_names

LAST = 'checkpoint_last.pth'
BEST = 'checkpoint_best.pth'
_NUMBERED = re.compile(r'checkpoint_(\d+)\.pth$')


# ---- trainer ----------------------------------------------------------------------
class MFTrainer(Trainer):
    """sevenn's Trainer with resumable, atomic checkpoints and fidelity metrics."""

    def setup_run(
        self,
        config: Dict[str, Any],
        working_dir: str,
        start_epoch: int,
        best_loader: Optional[str],
        best_value: float = math.inf,
    ) -> None:
        self.config = config
        self.working_dir = os.path.abspath(working_dir)
        self.epoch = start_epoch
        self.best_loader = best_loader
        self.best_metric = config.get(KEY.BEST_METRIC, 'TotalLoss')
        self.best_value = best_value
        self._epoch_best_candidate = math.inf
        self.user_per_epoch = int(config.get(KEY.PER_EPOCH, 10) or 10)
        self.metrics = FidelityMetrics()
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
        sampler = getattr(loader, 'sampler', None)
        if is_train and hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(self.epoch)
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
        if name == self.best_loader and error_recorder is not None:
            cur = error_recorder.get_current()
            if self.best_metric in cur:
                self._epoch_best_candidate = float(cur[self.best_metric]['value'])

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
        state = [self.optimizer.state_dict() if self.rank == 0 else None]
        dist.broadcast_object_list(state, src=0)
        if self.rank != 0:
            self.optimizer.load_state_dict(state[0])

    # called once per epoch, after all loaders
    def scheduler_step(self, metric: Optional[float] = None) -> None:
        Logger().write(self.metrics.table(self.epoch))
        lr = self.get_lr()  # of the epoch that just ran
        super().scheduler_step(metric)
        if self.rank == 0:
            self.metrics.write_epoch(self.metrics_csv, self.epoch, lr)
        else:
            self.metrics.reset()
        self.epoch += 1

    def write_checkpoint(self, path: str, **extra) -> None:
        if self.distributed and self.rank != 0:
            return
        base = os.path.basename(path)
        epoch = int(extra.get('epoch', 0))
        if base == BEST:
            if not self._epoch_best_candidate < self.best_value:
                return  # sevenn's loop forgets the best value on resume; we don't
            self.best_value = self._epoch_best_candidate
        cp = self.get_checkpoint_dict()
        cp.update(extra)
        cp['sevenn_mf'] = {
            'best_value': self.best_value,
            'best_loader': self.best_loader,
        }
        d = os.path.dirname(path)
        m = _NUMBERED.search(base)
        if m:
            atomic_torch_save(cp, os.path.join(d, LAST))
            total = int(self.config.get(KEY.EPOCH, epoch))
            if epoch == 0 or not (
                epoch % self.user_per_epoch == 0 or epoch == total
            ):
                return
        atomic_torch_save(cp, path)


def _uneven_steps(loader) -> bool:
    """Whether the ranks run different numbers of training steps this epoch
    (the same answer on every rank: it depends only on the sampler)."""
    sampler = getattr(loader, 'sampler', None)
    inner = getattr(loader, 'loader', loader)
    batch = getattr(inner, 'batch_size', None)
    if not isinstance(sampler, DatabaseSampler) or not batch:
        return False
    if sampler.mode != 'proportional':
        return False  # padded: equal steps by construction
    steps = {
        math.ceil(len(range(r, sampler.epoch_length, sampler.num_replicas)) / batch)
        for r in range(sampler.num_replicas)
    }
    return len(steps) > 1


def make_trainer(model: torch.nn.Module, config: Dict[str, Any]) -> MFTrainer:
    # Trainer.from_config is a staticmethod that instantiates Trainer itself;
    # re-classing its result keeps sevenn's config->arguments mapping in one place
    trainer = Trainer.from_config(model, {**config, KEY.IS_DDP: False})
    trainer.__class__ = MFTrainer
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
        loaders = make_loaders(data, config, rank=rank, world_size=world)
        logger.writeline(_data_summary(data))
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
        trainer = make_trainer(model, config)
        finetune.configure_optimizer(trainer, config, log=logger.writeline)
        logger.print_model_info(model, config)

        start_epoch, best_value = 1, math.inf
        if resume:
            cp = torch.load(last, map_location='cpu', weights_only=False)
            trainer.load_state_dicts(
                cp['model_state_dict'],
                cp['optimizer_state_dict'],
                cp['scheduler_state_dict'],
                strict=True,
            )
            start_epoch = int(cp['epoch']) + 1
            best_value = float(cp.get('sevenn_mf', {}).get('best_value', math.inf))
            logger.writeline(f'resuming from epoch {cp["epoch"]} ({last})')
        best_loader = _best_loader(config, loaders)
        trainer.setup_run(config, working_dir, start_epoch, best_loader, best_value)
        total = int(config[KEY.EPOCH])
        if start_epoch <= total:
            processing_epoch_v2(
                config,
                trainer,
                loaders,
                start_epoch=start_epoch,
                best_metric_loader_key=best_loader or 'validset',
                per_epoch=1,
                working_dir=working_dir,
            )
    if world > 1:
        # rank 0's checkpoints are complete. The process group is left to
        # process exit: destroying it (gloo, torch 2.13) now and then left a
        # rank hanging afterwards (1 run in ~15; 0 in 40 without).
        torch.distributed.barrier()
    best = os.path.join(working_dir, BEST)
    return best if os.path.isfile(best) else last


def _data_summary(data: TrainingData) -> str:
    rows = ['databases:']
    for db in data.databases:
        rows.append(
            f'  {db.spec.name:<24} fidelity {db.spec.fidelity:<10} '
            f'train {len(db.train):>6}  valid {len(db.valid):>6}'
        )
    return '\n'.join(rows)
