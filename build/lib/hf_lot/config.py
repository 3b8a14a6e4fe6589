"""`LoTConfig`: every option of the noise-curvature controller, savable and shareable.

The config follows the conventions of `transformers` configs: it is written
as ``lot_config.json`` by `save_pretrained`, read back by `from_pretrained`
from a local folder or a Hub repository, and uploaded by `push_to_hub`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import PushToHubMixin, cached_file
from transformers.utils import hub as transformers_hub

from .curvature import DEFAULT_FINITE_DIFFERENCE_STEP, EIGENSOLVERS, HVP_METHODS
from .threshold import VOLATILITY_MODES

__all__ = ["LOT_CONFIG_NAME", "InvalidLoTOptionError", "LoTConfig", "PRESETS"]

LOT_CONFIG_NAME = "lot_config.json"

WARM_PHASES = ("task_fraction", "run_fraction", "always", "never")
BOUNDS = ("combined", "noise", "volatility")
SHARPNESS_SCALES = ("layer", "global")
NOISE_FALLBACKS = ("split", "none")
GRANULARITIES = ("layer", "global")


class InvalidLoTOptionError(ValueError):
    """Error for a LoT option with an invalid value, or options that contradict each other."""


def _option(default: Any, help: str, **kwargs) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class LoTConfig(PushToHubMixin):
    """Options of the per-layer noise-curvature learning-rate controller.

    Defaults are the ``paper`` preset: the values of the method's paper
    (Baveja, Lewandowski and Schmidt, arXiv 2509.19698) where it states them.
    `PRESETS` lists the alternatives.
    """

    interval: int = _option(40, "Optimizer steps between two measurements and controller updates (K).")
    window: int = _option(30, "Number of past normalized-sharpness measurements in the volatility window (W).")
    gamma: float = _option(0.8, "Safety margin: cool a layer when alpha_l > gamma * threshold.")
    cool_factor: float = _option(0.99, "Factor applied to a layer's learning rate when it cools (c).")
    warm_factor: float = _option(1.01, "Factor applied to a layer's learning rate when it warms (u).")
    warm_ratio: float = _option(0.3, "Warm a layer when alpha_l < warm_ratio * gamma * threshold in the warm phase.")
    alpha_min: float = _option(0.12, "Never cool a layer whose effective step alpha_l is at or below this value.")
    warm_phase: str = _option(
        "task_fraction",
        "When warming is allowed: 'task_fraction' (first warm_fraction of each training run, that is each "
        "task), 'run_fraction' (first warm_fraction of the first task only), 'always' or 'never'.",
        choices=WARM_PHASES,
    )
    warm_fraction: float = _option(0.3, "Fraction of the steps used by warm_phase.")
    bound: str = _option(
        "combined",
        "Threshold the controller enforces: 'combined' (alpha_tilde*), 'noise' (alpha_g*) or 'volatility' "
        "(alpha_vol*).",
        choices=BOUNDS,
    )
    beta: float = _option(1.0, "Weight of curvature volatility in the inflated noise sigma2 + beta |g|^2 Vol.")
    volatility: str = _option(
        "window_variance",
        "Volatility term: 'window_variance' (paper), or the reference code's 'squared_deviation', "
        "'sharpness' and 'squared_ratio'.",
        choices=VOLATILITY_MODES,
    )
    kappa: float = _option(1.0, "Scale of the volatility bound alpha_vol* = 1 / (kappa Vol).")
    eps: float = _option(1e-8, "Small constant in Vol = s2 / (mu + eps).")
    sharpness_scale: str = _option(
        "layer",
        "Normalization of sharpness: 'layer' uses each layer's learning rate and second moment, 'global' "
        "the first group's learning rate and the mean second moment of all parameters (reference code).",
        choices=SHARPNESS_SCALES,
    )
    curvature: bool = _option(True, "Measure per-layer sharpness with Hessian-vector products.")
    hvp_iterations: int = _option(5, "Maximum power iterations per layer for a warm-started measurement.")
    hvp_cold_iterations: int = _option(20, "Maximum power iterations per layer for the first, random start.")
    hvp_tolerance: float = _option(1e-3, "Stop power iteration when the eigenvalue changes by less than this fraction.")
    hvp_batch_size: int | None = _option(
        None, "Examples of the last micro-batch used for Hessian-vector products; None uses all of them."
    )
    hvp_eval_mode: bool = _option(True, "Disable dropout during Hessian-vector products, so every product sees one loss.")
    hvp_method: str = _option(
        "auto",
        "How Hessian-vector products are computed: 'double_backward', 'finite_difference' (central differences "
        "of two ordinary gradients per product, no second derivative needed) or 'auto' (double backward, "
        "switching to finite differences for the model once double backward raises an error).",
        choices=HVP_METHODS,
    )
    hvp_fd_step: float = _option(
        DEFAULT_FINITE_DIFFERENCE_STEP,
        "Finite-difference perturbation norm as a fraction of the layer's root-mean-square parameter value.",
    )
    hvp_solver: str = _option(
        "power",
        "Eigensolver for the per-layer sharpness: 'power' (power iteration, as in the paper) or 'lanczos' "
        "(same number of Hessian-vector products, far more accurate when the two largest eigenvalues are close; "
        "keeps up to hvp_iterations vectors of the largest layer in memory).",
        choices=EIGENSOLVERS,
    )
    noise_every: int = _option(1, "Collect micro-batch noise statistics every this many optimizer steps.")
    noise_fallback: str = _option(
        "split",
        "With one micro-batch on one process: 'split' runs the micro-batch as two halves on noise steps "
        "(same gradient, no extra examples), 'none' measures no noise.",
        choices=NOISE_FALLBACKS,
    )
    control: bool = _option(True, "Change learning rates. False measures and logs only.")
    granularity: str = _option(
        "layer",
        "'layer' cools and warms each layer on its own; 'global' applies one decision, made from network-wide "
        "effective step and bound, to every layer's factor.",
        choices=GRANULARITIES,
    )
    layer_rules: list = _option(
        [], "Pairs [regex, layer_name] that override the default layer mapping; the first match wins."
    )
    seed: int = _option(0, "Seed of the random start vectors of power iteration.")

    def __post_init__(self):
        if not isinstance(self.layer_rules, (list, tuple)) or not all(
            isinstance(rule, (list, tuple)) for rule in self.layer_rules
        ):
            raise InvalidLoTOptionError(
                f"Invalid LoT option layer_rules={self.layer_rules!r}: expected a list of [regex, layer_name] pairs, "
                "for example [['encoder\\.layer\\.(\\d+)\\.', 'block.\\1']]."
            )
        self.layer_rules = [list(rule) for rule in self.layer_rules]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and its fix."""

        def fail(name: str, value: Any, requirement: str) -> None:
            raise InvalidLoTOptionError(f"Invalid LoT option {name}={value!r}: {requirement}.")

        for name in ("interval", "window", "hvp_iterations", "hvp_cold_iterations", "noise_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, value, "expected an integer of at least 1")
        for name in ("gamma", "cool_factor", "warm_factor", "warm_ratio", "kappa", "eps", "hvp_tolerance", "hvp_fd_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                fail(name, value, "expected a finite positive number")
        if not self.cool_factor < 1:
            fail("cool_factor", self.cool_factor, "expected a value below 1 (cooling lowers the learning rate)")
        if not self.warm_factor >= 1:
            fail("warm_factor", self.warm_factor, "expected a value of at least 1 (warming raises the learning rate)")
        if not self.warm_fraction <= 1:
            fail("warm_fraction", self.warm_fraction, "expected a fraction between 0 and 1")
        for name in ("beta", "alpha_min", "warm_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(name, value, "expected a finite non-negative number")
        if self.hvp_batch_size is not None and (not isinstance(self.hvp_batch_size, int) or self.hvp_batch_size < 1):
            fail("hvp_batch_size", self.hvp_batch_size, "expected a positive integer or None")
        for name, choices in (
            ("warm_phase", WARM_PHASES),
            ("bound", BOUNDS),
            ("volatility", VOLATILITY_MODES),
            ("sharpness_scale", SHARPNESS_SCALES),
            ("noise_fallback", NOISE_FALLBACKS),
            ("hvp_method", HVP_METHODS),
            ("hvp_solver", EIGENSOLVERS),
            ("granularity", GRANULARITIES),
        ):
            if getattr(self, name) not in choices:
                fail(name, getattr(self, name), f"expected one of {', '.join(choices)}")
        for rule in self.layer_rules:
            if len(rule) != 2 or not all(isinstance(part, str) for part in rule):
                fail("layer_rules", rule, "expected pairs [regex, layer_name] of strings")

        needs_volatility = self.bound == "volatility" or (self.bound == "combined" and self.beta > 0)
        if needs_volatility and not self.curvature:
            fail(
                "curvature",
                self.curvature,
                f"bound={self.bound!r} with beta={self.beta} needs curvature; set curvature=True, "
                "or beta=0 with bound='combined', or bound='noise'",
            )

    # -- presets ---------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LoTConfig:
        """Build the config of preset `name`, with `overrides` applied on top."""
        if name not in PRESETS:
            raise ValueError(f"Unknown LoT preset {name!r}; expected one of {', '.join(sorted(PRESETS))}.")
        return cls(**{**PRESETS[name], **overrides})

    # -- serialization ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoTConfig:
        """Build a config from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown LoT option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(known))}."
            )
        return cls(**values)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``lot_config.json`` into `save_directory`, and upload it when `push_to_hub` is set.

        As in `transformers.PretrainedConfig.save_pretrained`, ``repo_id``
        defaults to the folder's name, ``commit_message`` goes to the commit,
        the other keyword arguments (``token``, ``private``) go to
        `HfApi.create_repo`, and only files of the folder written by this
        call are uploaded.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder.")
        os.makedirs(save_directory, exist_ok=True)

        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            repo_id = transformers_hub.hf_api().create_repo(repo_id, exist_ok=True, **kwargs).repo_id
            files_timestamps = self._get_files_timestamps(save_directory)

        path = os.path.join(save_directory, LOT_CONFIG_NAME)
        temporary = f"{path}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())
        os.replace(temporary, path)

        if push_to_hub:
            self._upload_modified_files(
                save_directory, repo_id, files_timestamps, commit_message=commit_message, token=kwargs.get("token")
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        subfolder: str = "",
        **overrides,
    ) -> LoTConfig:
        """Load a config from a local folder or file, or from a Hub repository id.

        Hub files are resolved with `transformers.utils.cached_file`, so the
        cache, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` work as for model
        configs. Keyword `overrides` replace loaded values, as in
        `transformers` configs, but an unknown key raises a ValueError instead
        of being ignored.
        """
        path = os.fspath(pretrained_name_or_path)
        if os.path.isfile(path):
            resolved = path
        elif os.path.isdir(path):
            resolved = os.path.join(path, subfolder, LOT_CONFIG_NAME)
            if not os.path.isfile(resolved):
                raise FileNotFoundError(
                    f"No {LOT_CONFIG_NAME} in folder {os.path.join(path, subfolder)!r}. Save one there with "
                    "LoTConfig.save_pretrained, or pass the folder that contains it."
                )
        elif os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.endswith(".json"):
            raise FileNotFoundError(
                f"LoT config {path!r} not found: no such file or folder. Pass a folder that contains {LOT_CONFIG_NAME}, "
                "the file itself, or a Hub repository id such as owner/name."
            )
        else:
            resolved = cached_file(
                path,
                LOT_CONFIG_NAME,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                subfolder=subfolder,
            )

        with open(resolved, encoding="utf-8") as handle:
            try:
                values = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{resolved} is not valid JSON: {error}.") from error
        if not isinstance(values, dict):
            raise ValueError(f"{resolved} must contain a JSON object of LoT options.")
        return cls.from_dict({**values, **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's stated method and table: window variance, beta within [0, 1],
    # per-layer normalization, warming in the first 30% of each task.
    "paper": {},
    # The authors' reference code: beta = 20, the instantaneous squared
    # deviation as volatility, sharpness normalized by global Adam statistics,
    # and warming only while the step count is under 10% of one task.
    "reference": {
        "beta": 20.0,
        "volatility": "squared_deviation",
        "sharpness_scale": "global",
        "warm_phase": "run_fraction",
        "warm_fraction": 0.1,
    },
    # Measure and log every statistic without touching learning rates.
    "monitor": {"control": False},
}
