"""Multi-fidelity training through sevenn's own Trainer and epoch loop.

The flow: YAML -> databases -> validated frames -> graphs (cached) ->
per-fidelity references -> sevenn config -> sevenn's builder (with our
layers) -> ``MFTrainer`` (a sevenn ``Trainer`` subclass) ->
``sevenn.scripts.processing_epoch.processing_epoch_v2``.

``MFTrainer`` adds, by overriding a few Trainer methods, what the epoch loop
lacks: atomic checkpoints, a ``checkpoint_last.pth`` every epoch for resuming,
a best checkpoint chosen on a target fidelity that survives a resume, a
deterministic per-epoch order, and per-database / per-fidelity metrics in the
units people quote (meV/atom, meV/Å, GPa) in a CSV.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import sevenn._keys as KEY
import sevenn.util as sevenn_util
import torch
from sevenn.logger import Logger
from sevenn.scripts.processing_epoch import processing_epoch_v2
from sevenn.train.trainer import Trainer
from torch.utils.data import ConcatDataset
from torch_geometric.loader import DataLoader

from . import _sevenn as S
from . import finetune
from .checkpoint import atomic_torch_save
from .data import graphs as G
from .data.databases import (
    DatabaseSpec,
    parse_databases,
    read_frames,
    validate_frames,
)
from .data.references import as_univ_list, fit_reference_energies
from .data.sampler import DatabaseSampler, ShardSampler
from .data.store import force_sq_count
from .metrics import FidelityMetrics
from .model import build_model, fidelity_parameter_names, set_fidelities

LAST = 'checkpoint_last.pth'
BEST = 'checkpoint_best.pth'
_NUMBERED = re.compile(r'checkpoint_(\d+)\.pth$')


@dataclass
class Database:
    spec: DatabaseSpec
    train: List[Any] = field(default_factory=list)
    valid: List[Any] = field(default_factory=list)


@dataclass
class TrainingData:
    config: Dict[str, Any]
    databases: List[Database]

    @property
    def fidelities(self) -> List[str]:
        return list(self.config[S.FIDELITIES])

    def train_graphs(self) -> List[Any]:
        return [g for db in self.databases for g in db.train]

    def summaries(self, fidelity: Optional[str] = None) -> List[Any]:
        """Per-structure statistics inputs of the training structures (of one
        fidelity), in database order; from the store without reading graphs."""
        from .data.store import summarize

        out: List[Any] = []
        for db in self.databases:
            if fidelity is None or db.spec.fidelity == fidelity:
                out.extend(
                    db.train.summaries()
                    if hasattr(db.train, 'summaries')
                    else [summarize(g) for g in db.train]
                )
        return out

    def valid_sets(self) -> Dict[str, Any]:
        """Loader name -> graphs: all, per fidelity, per database."""
        sets: Dict[str, Any] = {}
        everything = _concat([db.valid for db in self.databases])
        if not len(everything):
            return sets
        sets['validset'] = everything
        for fid in self.fidelities:
            gs = _concat(
                [db.valid for db in self.databases if db.spec.fidelity == fid]
            )
            if len(gs):
                sets[f'{fid}_validset'] = gs
        if len(self.databases) > len(self.fidelities):
            for db in self.databases:
                if db.valid:
                    sets[f'{db.spec.name}_db_validset'] = db.valid
        return sets


def _concat(parts: List[Any]) -> Any:
    """Graph lists stay a list; on-disk datasets (data.storage: lmdb) are
    concatenated lazily."""
    parts = [p for p in parts if len(p)]
    if all(isinstance(p, list) for p in parts):
        return [g for p in parts for g in p]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# ---- data -------------------------------------------------------------------------
def _species_of(frames_by_db) -> List[str]:
    from ase.data import chemical_symbols

    numbers = set()
    for frames in frames_by_db.values():
        for fr in frames:
            numbers.update(int(z) for z in fr.numbers)
    return sorted(chemical_symbols[z] for z in numbers)


def prepare_data(
    config: Dict[str, Any], working_dir: str, log=print
) -> TrainingData:
    """Read, validate and graph all databases; fill the data-derived config
    (species, fidelities, references, scale, conv denominator). All input
    errors are raised here, before any model is built."""
    if config.get(S.STORAGE, 'memory') == 'lmdb':
        from .data.store import prepare_store_data

        return prepare_store_data(config, working_dir, log)
    config = copy.deepcopy(config)
    base_dir = config.get('_base_dir', os.getcwd())
    specs = parse_databases(config[S.DATABASES], base_dir)

    # 1. read + validate everything first: errors surface before long work
    frames_by_db = {}
    for spec in specs:
        frames_by_db[spec.name] = read_frames(spec)
    chem = config[KEY.CHEMICAL_SPECIES]
    auto_species = isinstance(chem, str) and chem.lower() == 'auto'
    known = None if auto_species else list(chem)
    for spec in specs:
        validate_frames(frames_by_db[spec.name], species=known)
    valid_frames = {}
    for spec in specs:
        vfiles = (spec.validation or {}).get('files')
        if vfiles:
            vspec = copy.deepcopy(spec)
            vspec.files = list(vfiles)
            vspec.validation = None
            valid_frames[spec.name] = read_frames(vspec)
            validate_frames(valid_frames[spec.name], species=known)

    if auto_species:
        config.update(
            sevenn_util.chemical_species_preprocess(
                _species_of({**frames_by_db, **valid_frames})
            )
        )

    _resolve_fidelities(config, specs)

    # 2. graphs
    cutoff = float(config[KEY.CUTOFF])
    cache_dir = config.get('graph_cache_dir') or os.path.join(
        working_dir, 'graph_cache'
    )
    databases = []
    seed = int(config.get(KEY.RANDOM_SEED, 1))
    for spec in specs:
        graphs = G.build_graphs(
            frames_by_db[spec.name],
            cutoff,
            spec.fidelity,
            spec.weight,
            cache_dir=cache_dir,
            desc=spec.name,
        )
        db = Database(spec)
        role = getattr(spec, 'role', 'train')
        if role == 'valid':
            db.valid = graphs
        elif spec.name in valid_frames:
            db.train = graphs
            db.valid = G.build_graphs(
                valid_frames[spec.name],
                cutoff,
                spec.fidelity,
                spec.weight,
                cache_dir=cache_dir,
                desc=f'{spec.name} (validation)',
            )
        elif spec.validation and spec.validation.get('ratio'):
            db.train, db.valid = G.split_validation(
                graphs,
                float(spec.validation['ratio']),
                int(spec.validation.get('seed', seed)),
            )
        else:
            db.train = graphs
        databases.append(db)
    data = TrainingData(config, databases)
    if not data.train_graphs():
        raise ValueError('no training structures: every database is validation-only')

    _fill_statistics(config, data, log)
    return data


def _resolve_fidelities(config: Dict[str, Any], specs: List[DatabaseSpec]) -> None:
    fids = list(config.get(S.FIDELITIES) or [])
    for spec in specs:
        if spec.fidelity not in fids:
            if config.get(S.FIDELITIES):
                raise ValueError(
                    f"database '{spec.name}' has fidelity '{spec.fidelity}', which "
                    f'is not in model.fidelities ({", ".join(fids)})'
                )
            fids.append(spec.fidelity)
    set_fidelities(config, fids, config[S.FIDELITY_LAYER_MODE])


def _fill_statistics(config: Dict[str, Any], data: TrainingData, log) -> None:
    """Per-fidelity element references (shift), shared scale, conv denominator."""
    from ase.data import chemical_symbols

    species = [chemical_symbols[z] for z in config[KEY.TYPE_MAP]]
    user_refs = config.get(S.REFERENCE_ENERGIES) or {}
    unknown = set(user_refs) - set(data.fidelities)
    if unknown:
        raise ValueError(
            f'data.reference_energies names unknown fidelities '
            f'{sorted(unknown)} (fidelities: {data.fidelities})'
        )
    shift = config.get(KEY.SHIFT)
    if isinstance(shift, str):
        if shift != 'elemwise_reference_energies':
            raise ValueError(
                'sevenn_mf fits per-fidelity element references: use '
                'shift: elemwise_reference_energies, or give numbers'
            )
        refs = {}
        for fid in data.fidelities:
            graphs = data.summaries(fid)
            fitted = fit_reference_energies(graphs, species) if graphs else {}
            fitted = {el: fitted.get(el, 0.0) for el in species}
            fitted.update(
                {k: float(v) for k, v in (user_refs.get(fid) or {}).items()}
            )
            refs[fid] = fitted
            log(
                f'reference energies ({fid}): '
                + ', '.join(f'{el} {e:.4f}' for el, e in fitted.items())
                + ' eV'
            )
        config[KEY.SHIFT] = {fid: as_univ_list(r) for fid, r in refs.items()}
        config[KEY.USE_MODAL_WISE_SHIFT] = True
    summaries = data.summaries()
    scale = config.get(KEY.SCALE)
    if isinstance(scale, str):
        if scale != 'force_rms':
            raise ValueError("scale must be 'force_rms' or a number")
        total, count = force_sq_count(summaries)  # = force_rms(train graphs)
        if count == 0:
            raise ValueError('no force labels: cannot compute a force scale')
        rms = float(np.sqrt(total / count))
        if not np.isfinite(rms) or rms <= 0:
            rms = 1.0
        config[KEY.SCALE] = float(rms)
        config[KEY.USE_MODAL_WISE_SCALE] = False
    denom = config.get(KEY.CONV_DENOMINATOR)
    if isinstance(denom, str):
        if denom not in ('avg_num_neigh', 'sqrt_avg_num_neigh'):
            raise ValueError(f'conv_denominator {denom!r} is not supported')
        n_edges = sum(s.n_edges for s in summaries)
        n_atoms = sum(s.n_atoms for s in summaries)
        avg = n_edges / max(n_atoms, 1)
        config[KEY.CONV_DENOMINATOR] = float(
            avg if denom == 'avg_num_neigh' else math.sqrt(avg)
        )
    has_stress = any(s.stress_ok for s in summaries)
    if config.get(KEY.IS_TRAIN_STRESS, True) and not has_stress:
        log('no training structure has a stress label: stress is not trained')
        config[KEY.IS_TRAIN_STRESS] = False


# ---- loaders ----------------------------------------------------------------------
class NamedLoader:
    """A DataLoader that knows its name (per-fidelity metrics need it)."""

    def __init__(self, name: str, loader: DataLoader) -> None:
        self.name = name
        self.loader = loader
        self.sampler = loader.sampler

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def make_loaders(
    data: TrainingData, config: Dict[str, Any], rank: int = 0, world_size: int = 1
) -> Dict[str, NamedLoader]:
    batch = int(config[KEY.BATCH_SIZE])
    sampling = dict(config.get(S.SAMPLING) or {})
    train_dbs = [db for db in data.databases if db.train]
    sampler = DatabaseSampler(
        [len(db.train) for db in train_dbs],
        mode=sampling.pop('mode', 'proportional'),
        names=[db.spec.name for db in train_dbs],
        seed=int(config.get(KEY.RANDOM_SEED, 1)),
        shuffle=bool(config.get(KEY.TRAIN_SHUFFLE, True)),
        num_replicas=world_size,
        rank=rank,
        **sampling,
    )
    train = _concat([db.train for db in train_dbs])
    extra = {}
    workers = int(config.get(KEY.NUM_WORKERS, 0) or 0)
    if workers > 0:  # e.g. with data.storage: lmdb, workers read the store
        extra = {'num_workers': workers, 'persistent_workers': True}
    loaders = {
        'trainset': NamedLoader(
            'trainset', DataLoader(train, batch_size=batch, sampler=sampler, **extra)
        )
    }
    for name, graphs in data.valid_sets().items():
        # under DDP each rank evaluates a disjoint shard; the errors are all-reduced
        shard = (
            ShardSampler(len(graphs), world_size, rank) if world_size > 1 else None
        )
        loaders[name] = NamedLoader(
            name, DataLoader(graphs, batch_size=batch, sampler=shard, **extra)
        )
    return loaders


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
