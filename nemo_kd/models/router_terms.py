"""The router's auxiliary losses as a term of the objective, and the experts' load, for an MoE student.

Megatron computes the router's losses inside each MoE layer's forward and attaches their gradient to
the routing weights with ``MoEAuxLossAutoScaler`` (``transformer/moe/router.py``): the load-balancing
loss ``moe_aux_loss_coeff * E / (k T^2) * sum_e P_e * n_e`` of each microbatch (``P_e``: the summed
router probabilities of expert ``e``, ``n_e``: the tokens routed to it, ``T`` tokens, top-``k``) and the
z-loss ``moe_z_loss_coeff * mean_t logsumexp(logits_t)^2``. Their backward scale is what the
schedule sets per microbatch (``1 / num_microbatches`` with nemo_kd's loss convention), and DDP
averages over the data-parallel ranks: each router term enters the objective as
``coeff * (mean over the global batch's microbatches of that microbatch's loss)``, summed over
MoE layers, whatever the microbatch split or the data / expert parallel layout.

:class:`RouterTerms` reads those values back from Megatron's logging tracker
(``get_moe_layer_wise_logging_tracker``) after a step, reduces them the same way (mean over
microbatches and DP ranks, sum over pipeline stages, Megatron's sum over TP x CP for the
load-balancing loss) and reports them as their own terms:

* ``router_loss``: the router terms' total contribution to the objective (coefficients applied;
  added to ``loss``, which is then the whole objective the step minimised);
* ``moe_load_balancing_loss`` / ``moe_seq_load_balancing_loss`` / ``moe_global_load_balancing_loss`` /
  ``moe_z_loss``: each loss without its coefficient, averaged over the MoE layers (Megatron-LM's log);

and, every ``load_log_interval`` steps, the load of every MoE layer ``l`` over the step's tokens:
``moe_tokens/layer{l}/expert{e}`` (tokens routed to expert ``e``, after token dropping),
``moe_load_entropy/layer{l}`` (entropy of that distribution / log E: 1 = balanced),
``moe_max_load/layer{l}`` (the busiest expert's tokens / the mean) and ``moe_dropped/layer{l}``
(the fraction of the ``k * T`` assignments dropped by the capacity factor).

:func:`check_token_dropping` is the one check of the forwards whose outputs must not depend on their
batch (extraction, the online teacher, sampling): with token dropping an expert takes at most
``ceil(capacity_factor * T * k / E)`` of the ``T`` tokens of *one forward*, in eval too, so a row's
logits depend on the rows it shares that forward with.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from nemo_kd.models.config import GPTModelConfig
from nemo_kd.parallel import state

__all__ = ["RouterTerms", "AUX_LOSS_NAMES", "token_dropping_capacity", "check_token_dropping"]

# moe_router_load_balancing_type -> the name Megatron's router logs that loss under.
AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                  "global_aux_loss": "global_load_balancing_loss"}
Z_LOSS = "z_loss"


def token_dropping_capacity(model_or_config: Any) -> Optional[float]:
    """``moe_expert_capacity_factor`` of an MoE that drops tokens, else None (dropless, dense, or not a Megatron
    model). Takes a :class:`GPTModelConfig`, a Megatron ``TransformerConfig``, or a model (its ``.config``;
    Float16Module / DDP wrappers are unwrapped through ``.module``)."""
    obj = model_or_config
    while obj is not None:
        for cfg in (obj, getattr(obj, "config", None)):
            if cfg is not None and hasattr(cfg, "moe_expert_capacity_factor"):
                if not getattr(cfg, "num_moe_experts", None):
                    return None
                return cfg.moe_expert_capacity_factor
        obj = getattr(obj, "module", None)
    return None


def check_token_dropping(model_or_config: Any, what: str, consequence: str, remedy: str, refuse: bool = False,
                         stacklevel: int = 2) -> None:
    """Warn (``refuse``: raise ValueError) when ``model_or_config`` is an MoE with token dropping: ``what`` runs
    forwards whose rows share experts' capacity, so ``consequence``; the message ends with ``set {remedy}``.

    Raises:
        ValueError: ``refuse`` and the model drops tokens.
    """
    capacity_factor = token_dropping_capacity(model_or_config)
    if capacity_factor is None:
        return
    message = (f"{what} from an MoE with token dropping (moe_expert_capacity_factor={capacity_factor}): an expert "
               f"takes at most ceil(capacity_factor * tokens * topk / experts) of the tokens of one forward, in "
               f"eval too, so {consequence}; set {remedy}")
    if refuse:
        raise ValueError(message)
    warnings.warn(message, stacklevel=stacklevel + 1)


def _routers(chunks) -> List[torch.nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class RouterTerms:
    """The router terms and expert-load statistics of this rank's student chunks (see the module doc)."""

    def __init__(self, cfg: GPTModelConfig, chunks, load_log_interval: int = 100):
        if not cfg.is_moe:
            raise ValueError("RouterTerms needs an MoE student (num_moe_experts set)")
        if not isinstance(load_log_interval, int) or load_log_interval < 0:
            raise ValueError(f"moe load_log_interval must be an integer >= 0 (0: never), got {load_log_interval!r}")
        self.cfg = cfg
        self.load_log_interval = load_log_interval
        self.terms: Dict[str, float] = {}  # Megatron's tracker name -> its coefficient in the objective
        if cfg.moe_aux_loss_coeff > 0 and cfg.moe_router_load_balancing_type in AUX_LOSS_NAMES:
            self.terms[AUX_LOSS_NAMES[cfg.moe_router_load_balancing_type]] = float(cfg.moe_aux_loss_coeff)
        if cfg.moe_z_loss_coeff is not None:
            self.terms[Z_LOSS] = float(cfg.moe_z_loss_coeff)
        self.num_moe_layers = sum(cfg.moe_layer_pattern())
        self.routers = _routers(chunks)
        self._collect = False
        self._load = torch.zeros(cfg.num_layers, cfg.num_moe_experts, dtype=torch.float64)
        self._tokens = torch.zeros(cfg.num_layers, dtype=torch.float64)
        self.expert_load: Optional[torch.Tensor] = None  # [num_layers, E] tokens per expert, last logged step
        for router in self.routers:
            router.register_forward_hook(self._count_load)

    # ---- expert load (forward hooks on the routers) ----
    def _count_load(self, router, inputs, output):
        # Training forwards only, once per token: a recomputed forward (activation recompute) runs its
        # first pass without grad, the eval / teacher forwards without grad or in eval mode.
        if not self._collect or not router.training or not torch.is_grad_enabled():
            return
        _, routing_map = output
        layer = router.layer_number - 1  # Megatron's global, 1-based layer number
        with torch.no_grad():
            self._load[layer] += routing_map.sum(dim=0).to("cpu", torch.float64)
            self._tokens[layer] += routing_map.shape[0]

    # ---- a step ----
    def begin_step(self, step: int) -> None:
        """Before the schedule: empty Megatron's tracker (with an entry for every term, so stages without MoE
        layers take part in the reductions) and decide whether this step's load is logged."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        for name in self.terms:
            if name not in tracker:
                tracker[name] = {"values": torch.zeros(self.cfg.num_layers, device=state.device()),
                                 "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False}
        clear_aux_losses_tracker()
        self._collect = self.load_log_interval > 0 and step % self.load_log_interval == 0
        self._load.zero_()
        self._tokens.zero_()

    def end_step(self, num_microbatches: int) -> Dict[str, float]:
        """After the schedule (every rank): the router terms of the step, and the load when it is logged."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        metrics: Dict[str, float] = {}
        router_loss = 0.0
        for name, coeff in self.terms.items():
            entry = tracker[name]
            per_layer = entry["values"].detach().to(state.device(), torch.float64) / num_microbatches
            group = entry.get("reduce_group")
            if group is not None and group.size() > 1:
                # TP x CP ranks each hold a part of the tokens' probabilities (Megatron's reduction)
                dist.all_reduce(per_layer, group=group)
            elif group is None and state.tp_size() > 1:
                # z_loss has no reduce group: each TP rank logs the mean over the tokens it routed (under
                # sequence parallelism its 1/TP of every row, the same count on every rank; Megatron scales
                # its gradient by 1/TP), so the step's value is the ranks' average (identical values without SP)
                dist.all_reduce(per_layer, group=state.tp_group())
                per_layer /= state.tp_size()
            if not entry.get("reduce_group_has_dp", False) and state.dp_size() > 1:
                dist.all_reduce(per_layer, group=state.dp_group())
                per_layer /= state.dp_size()
            if state.pp_size() > 1:  # each stage holds its own layers' values
                dist.all_reduce(per_layer, group=state.pp_group())
            total = float(per_layer.sum())
            metrics[f"moe_{name}"] = total / max(self.num_moe_layers, 1)
            router_loss += coeff * total
        clear_aux_losses_tracker()
        if self.terms:
            metrics["router_loss"] = router_loss
        if self._collect:
            metrics.update(self._load_metrics())
            self._collect = False
        return metrics

    # The metrics of the load_log_interval steps (the others carry none of these keys): a trainer logs them on
    # their own steps only (Lightning would repeat a step-logged key's last value at every later step of the epoch).
    INTERVAL_METRIC_PREFIXES = ("moe_tokens/", "moe_load_entropy/", "moe_max_load/", "moe_dropped/")

    def _load_metrics(self) -> Dict[str, float]:
        load = torch.cat([self._load, self._tokens[:, None]], dim=1).to(state.device())
        if state.dp_size() > 1:
            dist.all_reduce(load, group=state.dp_group())
        parallel = state.config()
        if parallel is not None and parallel.sequence_parallel and state.tp_size() > 1:
            dist.all_reduce(load, group=state.tp_group())  # each TP rank routed its own slice of the rows
        if state.pp_size() > 1:
            dist.all_reduce(load, group=state.pp_group())
        load = load.cpu()
        tokens_per_expert, tokens = load[:, :-1], load[:, -1]
        self.expert_load = tokens_per_expert.clone()
        k, n = self.cfg.moe_router_topk, self.cfg.num_moe_experts
        out: Dict[str, float] = {}
        for layer, is_moe in enumerate(self.cfg.moe_layer_pattern()):
            if not is_moe or tokens[layer] == 0:
                continue
            counts = tokens_per_expert[layer]
            kept = float(counts.sum())
            for e in range(n):
                out[f"moe_tokens/layer{layer}/expert{e}"] = float(counts[e])
            p = counts / kept if kept > 0 else counts
            entropy = -float((p[p > 0] * p[p > 0].log()).sum())
            out[f"moe_load_entropy/layer{layer}"] = entropy / math.log(n) if n > 1 else 1.0
            out[f"moe_max_load/layer{layer}"] = float(counts.max()) / (kept / n) if kept > 0 else 0.0
            out[f"moe_dropped/layer{layer}"] = 1.0 - kept / (k * float(tokens[layer]))
        return out
