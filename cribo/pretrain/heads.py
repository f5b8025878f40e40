"""DINO projection head with a shared MLP and two last layers (global and object), CrIBo appendix A.1.

    x (.., D) -> MLP (Linear-GELU-Linear-GELU-Linear) -> (.., bottleneck) -> L2-normalise
              -> last_layer_global (for the [CLS] token, Eq. 9)  -> (.., L)
              -> last_layer_object (for object vectors, Eq. 5, 7) -> (.., L)

The last layers are weight-normalised, bias-free linear maps (DINO): ``W = g * v / ||v||`` row-wise.
With ``norm_last_layer=True`` (DINO's default) ``g`` is fixed to 1, so the module holds ``v`` only and
the state dict is ``{weight_v}``; otherwise ``g`` is a trainable ``weight_g`` of shape (L, 1)
initialised to 1. Initialisation as DINO: MLP weights trunc_normal(std=0.02), biases 0; ``v`` keeps
nn.Linear's default init (DINO creates the last layer after applying its init).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with a row-normalised weight: ``y = x @ (g * v / ||v||_row).T``.

    Args:
        in_dim: input features.
        out_dim: output features L.
        learn_scale: if False, ``g`` is fixed to 1 (no ``weight_g`` parameter); if True, ``weight_g``
            (out_dim, 1) is a parameter initialised to 1.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)), as DINO's last layer gets.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1)) if learn_scale else None

    def weight(self) -> torch.Tensor:
        """The effective (out_dim, in_dim) weight."""
        w = F.normalize(self.weight_v, dim=1, eps=1e-12)
        return w if self.weight_g is None else w * self.weight_g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(.., in_dim) -> (.., out_dim)."""
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, learn_scale={self.weight_g is not None}"


class DINOHead(nn.Module):
    """Shared-MLP DINO head with a global and an object last layer.

    Args:
        in_dim: backbone embedding dim D.
        out_dim: number of prototypes L (65536 in the paper, for both outputs).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: MLP output width before the L2 normalisation (256).
        nlayers: number of Linear layers in the MLP (>= 1; 3 in DINO).
        norm_last_layer: fix the last layers' weight-norm scale to 1 (DINO's default, stabilises training).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim)):
            if v <= 0:
                raise ValueError(f"DINOHead: {name} must be > 0, got {v}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        if nlayers == 1:
            self.mlp = nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)
        self.last_layer_global = WeightNormLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)
        self.last_layer_object = WeightNormLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Shared part: (.., D) -> L2-normalised (.., bottleneck_dim).

        Lets a caller run the MLP once on [CLS] and object vectors concatenated, then apply each last layer.
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead: input last dim is {x.shape[-1]}, expected in_dim={self.in_dim}")
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward_global(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] head (Eq. 9): (.., D) -> (.., L) logits."""
        return self.last_layer_global(self.embed(x))

    def forward_object(self, x: torch.Tensor) -> torch.Tensor:
        """Object head (Eq. 5, 7): (.., D) -> (.., L) logits."""
        return self.last_layer_object(self.embed(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of both last layers (frozen during the first epoch(s))."""
        return [*self.last_layer_global.parameters(), *self.last_layer_object.parameters()]

    def cancel_last_layer_gradients(self) -> None:
        """Drop the last layers' gradients (``grad = None``) so the optimiser skips them this step.

        DINO's ``cancel_gradients_last_layer``: call after backward (and after unscale/clipping), before
        ``optimizer.step()``, during the frozen warm-up epochs. ``None`` (not zero) also skips AdamW's
        moment updates and weight decay, as in DINO.
        """
        for p in self.last_layer_parameters():
            p.grad = None
