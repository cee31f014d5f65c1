"""An exponential moving average of the weights (``train.ema_decay``).

Adam moves every weight by about the learning rate per step, whatever the
size of its gradient. Parameters that set an energy offset (the scalar biases
of the fidelity layers, the readout) then swing from step to step: in the
InGaN multi-fidelity stage the heads' mean gap on the r2SCAN validation cells
moved by 20-40 meV/atom between consecutive epochs even in the last ten, so
which epoch early stopping kept decided much of the error. Validating,
checkpointing and deploying the average of the recent weights (Polyak
averaging, as MACE's ``--ema`` and NequIP's ``use_ema`` do) removes that
swing; training itself continues from the raw weights.

:class:`WeightAverage` is updated after every optimizer step (a step hook);
:class:`sevenn_mf.train.MFTrainer` loads the average before each validation
pass and the raw weights before each training epoch, so the validation
metrics, the gap monitor, early stopping and every checkpoint's
``model_state_dict`` are those of the average. The raw weights and the number
of updates go into the checkpoint too, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch


class EMAError(ValueError):
    pass


def check_decay(value: Any) -> float:
    """``train.ema_decay``: 0 (off) or a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EMAError(f'train.ema_decay must be a number in [0, 1), got {value!r}')
    if not 0.0 <= float(value) < 1.0:
        raise EMAError(
            f'train.ema_decay must be in [0, 1) (0: off; 0.99 averages over '
            f'about the last 100 steps), got {value!r}'
        )
    return float(value)


class WeightAverage:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        decay: float,
    ) -> None:
        self.decay = check_decay(decay)
        self.names: List[str] = []
        self.params: List[torch.nn.Parameter] = []
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.names.append(n)
                self.params.append(p)
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0
        self._raw: Optional[List[torch.Tensor]] = None
        optimizer.register_step_post_hook(self._update)

    def _rate(self) -> float:
        # the average starts short and grows to 1 / (1 - decay) steps, so
        # that it is not anchored to the starting weights
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def _update(self, optimizer, args, kwargs) -> None:
        if self._raw is not None:
            raise RuntimeError(
                'optimizer step while the averaged weights are loaded'
            )
        d = self._rate()
        self.updates += 1
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @torch.no_grad()
    def load_average(self) -> None:
        if self._raw is not None:
            return
        self._raw = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @torch.no_grad()
    def load_raw(self) -> None:
        if self._raw is None:
            return
        for r, p in zip(self._raw, self.params):
            p.copy_(r)
        self._raw = None

    @torch.no_grad()
    def broadcast_from(self, src: int) -> None:
        """Every rank takes ``src``'s average (DDP: after a rank took steps the
        others did not)."""
        import torch.distributed as dist

        for s in self.shadow:
            dist.broadcast(s, src=src)
        n = [self.updates]
        dist.broadcast_object_list(n, src=src)
        self.updates = int(n[0])

    def state_dict(self) -> Dict[str, Any]:
        raw = self._raw if self._raw is not None else self.params
        return {
            'decay': self.decay,
            'updates': self.updates,
            'shadow': {n: s.detach().cpu() for n, s in zip(self.names, self.shadow)},
            'raw': {n: r.detach().cpu() for n, r in zip(self.names, raw)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a run written with the average loaded: the raw weights go
        back into the model, the average into the shadow."""
        missing = set(self.names) - set(state['shadow'])
        if missing:
            raise EMAError(
                f'the checkpoint has no averaged weights for {sorted(missing)[:3]}'
            )
        self.updates = int(state['updates'])
        for n, s, p in zip(self.names, self.shadow, self.params):
            s.copy_(state['shadow'][n].to(s.device))
            p.copy_(state['raw'][n].to(p.device))
        self._raw = None
