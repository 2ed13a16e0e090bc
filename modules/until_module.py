"""Small shared pieces of the CLIP4Clip heads: TF-style LayerNorm, weight init and loading, CrossEn, AllGather."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from util import get_rank, get_world_size

logger = logging.getLogger(__name__)


def is_log_rank(task_config: Any = None) -> bool:
    """True on the process that logs: ``task_config.local_rank == 0`` when given (the original's test), else rank 0."""
    local_rank = getattr(task_config, "local_rank", None)
    return local_rank == 0 if local_rank is not None else get_rank() == 0


class LayerNorm(nn.Module):
    """LayerNorm in the TF style: epsilon inside the square root, biased variance, no dtype casts."""

    def __init__(self, hidden_size: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class PreTrainedModel(nn.Module):
    """Base of CrossModel and CLIP4Clip: BERT-style weight init and a logging, non-strict weight load.

    ``config`` needs an ``initializer_range`` (the std of the N(0, std) init of Linear and Embedding weights).
    """

    def __init__(self, config: Any):
        super().__init__()
        if not hasattr(config, "initializer_range"):
            raise ValueError(f"{type(self).__name__}(config): config has no 'initializer_range' ({config!r})")
        self.config = config

    def init_weights(self, module: nn.Module) -> None:
        """Linear/Embedding weights ~ N(0, initializer_range), Linear biases 0, TF-LayerNorms to identity.

        torch's own LayerNorm (CLIP's), LSTMs, MHA ``in_proj_*`` and raw Parameters are left alone, as in the
        original.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter (fp32 for every head module)."""
        return next(self.parameters()).dtype

    @classmethod
    def init_preweight(
        cls,
        model: nn.Module,
        state_dict: dict[str, torch.Tensor],
        prefix: str | None = None,
        task_config: Any = None,
    ) -> nn.Module:
        """Load ``state_dict`` into ``model`` non-strictly and log what did not match (rank 0, prefix None).

        Keys containing ``gamma``/``beta`` are renamed to ``weight``/``bias``; ``prefix`` is prepended to every key
        when given. Each tensor is copied into the existing parameter and takes its dtype. Shape mismatches are
        logged as errors and skipped, not raised.
        """
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            new_key = key.replace("gamma", "weight").replace("beta", "bias")
            if prefix is not None:
                new_key = prefix + new_key
            renamed[new_key] = value

        own = model.state_dict()
        error_msgs: list[str] = []
        loadable: dict[str, torch.Tensor] = {}
        for key, value in renamed.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                    f"the parameter in the model has shape {tuple(own[key].shape)}"
                )
                continue
            loadable[key] = value
        result = model.load_state_dict(loadable, strict=False)
        # A key of the wrong shape was present, so it is reported as an error, not as missing.
        missing_keys = [key for key in result.missing_keys if key not in renamed]

        if prefix is None and is_log_rank(task_config):
            name = type(model).__name__
            logger.info("-" * 20)
            if missing_keys:
                logger.info(
                    "Weights of %s not initialized from pretrained model: %s",
                    name,
                    "\n   " + "\n   ".join(missing_keys),
                )
            if result.unexpected_keys:
                logger.info(
                    "Weights from pretrained model not used in %s: %s",
                    name,
                    "\n   " + "\n   ".join(result.unexpected_keys),
                )
            if error_msgs:
                logger.error(
                    "Weights from pretrained model cause errors in %s: %s", name, "\n   " + "\n   ".join(error_msgs)
                )
        return model


class CrossEn(nn.Module):
    """Cross-entropy of each row against its diagonal entry: mean_i -log_softmax(S)[i, i]."""

    def forward(self, sim_matrix: torch.Tensor) -> torch.Tensor:
        logpt = torch.diag(F.log_softmax(sim_matrix, dim=-1))
        return (-logpt).mean()


class AllGather(torch.autograd.Function):
    """Concatenate a tensor from every rank on dim 0; backward hands back only this rank's slice.

    The backward does no cross-rank sum: every rank computes the same global loss, and DDP's gradient averaging
    then gives each parameter 1/world_size of the global-loss gradient (the original's behaviour, kept on purpose).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        output = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(output, tensor.contiguous())
        ctx.rank = dist.get_rank()
        ctx.batch_size = tensor.shape[0]
        return torch.cat(output, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output[ctx.batch_size * ctx.rank : ctx.batch_size * (ctx.rank + 1)]


def allgather(tensor: torch.Tensor) -> torch.Tensor:
    """:class:`AllGather` when a process group of more than one rank runs, the tensor itself otherwise."""
    if get_world_size() == 1:
        return tensor
    return AllGather.apply(tensor)
