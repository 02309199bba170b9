"""LoRA (Hu et al., 2021) on the projections of T5 and the Llama-style decoder, as PEFT does it.

Each adapted kernel W (flanjax's einsum layout: the input axes, then the output
axes) gets A [*in, r] and B [r, *out]; the projection becomes
x W + dropout(x) A B * alpha / r. The adapters travel beside the parameters in
a second variable collection, "lora", nested like the params:
{"encoder_layer_0": {"attention": {"q": {"a": A, "b": B}}}}. The models call
`add` after each projection, so a model without that collection is unchanged;
`variables` puts the scale into B (its gradient is still the scaled one).

Modules are named as Hugging Face spells them (T5 q, k, v, o, wi_0, wi_1, wo; Llama
q_proj ... down_proj) and chosen as PEFT chooses them: a list of names (a name
matches a module whose dotted path ends with it) or one regular expression that
must match the whole path, e.g. r".*encoder.*\\.(q|v)" or r".*EncDecAttention\\.(q|v)".
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import UserError
from flanjax.models import stack
# The models' hook; COLLECTION, add and dropout are part of this module's interface.
from flanjax.models.lora_hook import COLLECTION, add, dropout  # noqa: F401


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """train.peft = @LoraConfig(): rank r, scale alpha / r, dropout on the adapter's input,
  targets (names or one pattern; default q and v as PEFT's for T5 and Llama), and the
  dtype the frozen base is held in while the adapters train in float32."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Sequence[str] | str | None = None
  base_dtype: str = "float32"

  def __post_init__(self):
    if not isinstance(self.targets, (str, type(None))):
      object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank <= 0:
      raise UserError(f"LoraConfig.rank={self.rank}: the rank must be a positive integer")
    if self.alpha <= 0:
      raise UserError(f"LoraConfig.alpha={self.alpha}: alpha must be positive (scale alpha/rank)")
    if not 0 <= self.dropout < 1:
      raise UserError(f"LoraConfig.dropout={self.dropout} must be in [0, 1)")
    if self.base_dtype not in ("float32", "bfloat16"):
      raise UserError(f"LoraConfig.base_dtype={self.base_dtype!r} is not float32 or bfloat16")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def describe(self) -> dict:
    targets = self.targets if isinstance(self.targets, (str, type(None))) else list(self.targets)
    return {"type": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
            "targets": targets, "base_dtype": self.base_dtype}


# ---------------------------------------------------------------- which modules

@dataclasses.dataclass(frozen=True)
class Site:
  """One adaptable projection: our param path, its Hugging Face module path, in/out shapes."""
  path: tuple
  hf_name: str
  in_shape: tuple
  out_shape: tuple

  @property
  def short(self) -> str:
    return self.hf_name.rsplit(".", 1)[-1]


def sites(cfg) -> list[Site]:
  """Every projection of the model that LoRA can adapt."""
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  return [Site(tuple(path), name, tuple(i), tuple(o)) for path, name, i, o in hf.linear_modules(cfg)]


def select(cfg, targets) -> list[Site]:
  """The sites that `targets` names (PEFT's rule); an unknown name lists the model's."""
  every = sites(cfg)
  names = sorted({s.short for s in every})
  if targets is None:
    targets = ("q_proj", "v_proj") if "q_proj" in names else ("q", "v")
  if not isinstance(targets, str) and not targets:
    raise UserError("LoraConfig.targets is empty, so nothing would train: name some of this "
                    f"model's modules ({', '.join(names)}) or leave targets unset (q and v)")
  if isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as e:
      raise UserError(f"LoraConfig.targets {targets!r} is not a valid pattern ({e})") from None
    chosen = [s for s in every if pattern.fullmatch(s.hf_name)]
    if not chosen:
      raise UserError(f"LoraConfig.targets {targets!r} matches no module: one string is a "
                      f"regular expression over the whole path (e.g. {every[0].hf_name}); for "
                      f"module names give a list, e.g. [{targets!r}]. This model's modules: "
                      f"{', '.join(names)}")
    return chosen
  unknown = [t for t in targets if not any(s.hf_name == t or s.hf_name.endswith("." + t)
                                           for s in every)]
  if unknown:
    raise UserError(f"LoraConfig.targets: {', '.join(map(repr, unknown))} not a module of this "
                    f"model; its modules are {', '.join(names)}")
  return [s for s in every
          if any(s.hf_name == t or s.hf_name.endswith("." + t) for t in targets)]


def check_rank(site: Site, rank: int) -> None:
  width = min(math.prod(site.in_shape), math.prod(site.out_shape))
  if rank > width:
    raise UserError(f"LoraConfig.rank={rank} is larger than the width of {site.hf_name} "
                    f"({width}); give a rank of at most {width}")


# ---------------------------------------------------------------- adapter trees

def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def init(chosen: Sequence[Site], rank: int, rng) -> dict:
  """A as PEFT initialises it (kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))), B zero."""
  out: dict = {}
  keys = jax.random.split(rng, max(len(chosen), 1))
  for key, s in zip(keys, chosen):
    bound = 1.0 / math.sqrt(math.prod(s.in_shape))
    a = jax.random.uniform(key, s.in_shape + (rank,), jnp.float32, -bound, bound)
    _set(out, s.path, {"a": a, "b": jnp.zeros((rank,) + s.out_shape, jnp.float32)})
  return out


def logical_axes(chosen: Sequence[Site], base_axes: dict) -> dict:
  """The adapters' logical axis names: A the kernel's input axes, B its output axes, the
  rank axis unsharded. base_axes: 'a/b/c' -> the kernel's names."""
  out: dict = {}
  for s in chosen:
    names = stack.axes_of(base_axes, s.path)
    n_in = len(s.in_shape)
    _set(out, s.path, {"a": names[:n_in] + (None,), "b": (None,) + names[n_in:]})
  return out


def variables(base, adapters, scale: float) -> dict:
  """The variables a model applies with: the base params and the adapters, B scaled.

  Adapters are kept per layer (a run's state, checkpoints, PEFT files); over a scanned
  base (scan_layers) they are stacked here like its layers, inside the step."""
  lora = {k: _scaled(v, scale) for k, v in adapters.items()}
  lora = stack.scan_params(lora) if stack.is_scanned(base) else stack.unscan_params(lora)
  return {"params": base, COLLECTION: lora}


def _scaled(node, scale):
  if isinstance(node, dict) and set(node) == {"a", "b"}:
    return {"a": node["a"], "b": node["b"] * scale}
  return {k: _scaled(v, scale) for k, v in node.items()}


def pairs(adapters, prefix=()):
  """(path, {"a", "b"}) of every adapted kernel."""
  for k, v in adapters.items():
    if set(v) == {"a", "b"} and not isinstance(v["a"], dict):
      yield prefix + (k,), v
    else:
      yield from pairs(v, prefix + (k,))


def merge(base, adapters, scale: float, dtype=None):
  """The base params with every adapted kernel replaced by W + A B * scale (float32 sum);
  in the base's layout (scan_layers or not), the adapters in either."""
  scanned = stack.is_scanned(base)
  base, adapters = stack.unscan_params(base), stack.unscan_params(adapters)
  out = jax.tree.map(lambda x: x, base)  # a copy of the tree's containers
  for path, ab in pairs(adapters):
    w = _get(base, path)
    a, b = ab["a"], ab["b"]
    r = a.shape[-1]
    delta = (a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32))
    merged = w.astype(jnp.float32) + scale * delta.reshape(w.shape)
    _set(out, path, merged.astype(dtype or w.dtype))
  return stack.scan_params(out) if scanned else out


def fingerprint(params) -> str:
  """A digest of a parameter tree: names, shapes and every value (the base a run's adapters
  were trained over, recorded in its run_info.json)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  h = hashlib.blake2b(digest_size=12)
  # The same digest for a base held scanned (scan_layers) or not.
  for name, leaf in sorted(kinds.flat_params(stack.unscan_params(params)).items()):
    arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update(f"{name}:{arr.shape};".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def fitted_sites(adapters, cfg, source: str) -> list[Site]:
  """The sites an adapter tree covers, each A and B checked against the base's shapes."""
  every = {s.path: s for s in sites(cfg)}
  out = []
  for path, ab in pairs(stack.unscan_params(adapters)):
    site = every.get(tuple(path))
    if site is None:
      raise UserError(f"{source}: adapter {'/'.join(path)} has no projection in the base model")
    a, b = np.shape(ab["a"]), np.shape(ab["b"])
    if a[:-1] != site.in_shape or b[1:] != site.out_shape:
      raise UserError(f"{source}: the adapter does not fit the base at {site.hf_name}: A {a}, "
                      f"B {b}; the base's kernel is {site.in_shape + site.out_shape}")
    out.append(site)
  return out


def merge_numpy(base, adapters, config: LoraConfig, cfg, source: str):
  """Host params of the base with the adapters merged (float32), after checking they fit."""
  fitted_sites(adapters, cfg, source)
  return jax.tree.map(np.asarray, merge(base, jax.tree.map(np.asarray, adapters), config.scale,
                                        dtype=np.float32))


# ---------------------------------------------------------------- PEFT's files

def peft_key(site_or_name, which: str) -> str:
  name = site_or_name.hf_name if isinstance(site_or_name, Site) else site_or_name
  return f"base_model.model.{name}.lora_{which}.weight"


def to_peft(adapters, chosen: Sequence[Site]) -> dict:
  """PEFT's tensors: lora_A.weight [r, in], lora_B.weight [out, r] (numpy float32)."""
  out = {}
  adapters = stack.unscan_params(adapters)  # a scan_layers run's, per layer
  for s in chosen:
    ab = _get(adapters, s.path)
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    r = a.shape[-1]
    out[peft_key(s, "A")] = np.ascontiguousarray(a.reshape(-1, r).T)
    out[peft_key(s, "B")] = np.ascontiguousarray(b.reshape(r, -1).T)
  return out


def from_peft(tensors: dict, cfg, source: str) -> tuple[dict, list[Site], int]:
  """(adapters, sites, rank) from PEFT's tensors; a base of other shapes is named. rank: the
  most common one (modules may differ, PEFT's rank_pattern; `site_rank` gives each)."""
  every = {s.hf_name: s for s in sites(cfg)}
  found: dict = {}
  for key, w in tensors.items():
    m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
    if not m:
      raise UserError(f"{source}: tensor {key} is not a LoRA weight flanjax reads "
                      "(base_model.model.<module>.lora_A|lora_B.weight)")
    found.setdefault(m.group(1), {})[m.group(2)] = np.asarray(w, np.float32)
  adapters: dict = {}
  chosen, ranks = [], collections.Counter()
  for name, ab in sorted(found.items()):
    site = every.get(name)
    if site is None:
      raise UserError(f"{source}: module {name} is not in the base model (its modules look "
                      f"like {next(iter(every))})")
    if set(ab) != {"A", "B"}:
      raise UserError(f"{source}: module {name} has lora_{''.join(ab)} only")
    a, b = ab["A"], ab["B"]
    n_in, n_out = math.prod(site.in_shape), math.prod(site.out_shape)
    if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
      raise UserError(f"{source}: the adapter does not fit the base at {name}: lora_A "
                      f"{tuple(a.shape)}, lora_B {tuple(b.shape)}; the base's layer is "
                      f"{n_in} -> {n_out} (A [r, {n_in}], B [{n_out}, r])")
    r = a.shape[0]
    ranks[r] += 1
    _set(adapters, site.path, {"a": a.T.reshape(site.in_shape + (r,)),
                               "b": b.T.reshape((r,) + site.out_shape)})
    chosen.append(site)
  if not chosen:
    raise UserError(f"{source}: no LoRA weights found")
  return adapters, chosen, max(ranks, key=lambda r: (ranks[r], r))


def site_rank(adapters, site: Site) -> int:
  """A module's rank, from its A's last axis."""
  return int(np.shape(_get(adapters, site.path)["a"])[-1])


# ---------------------------------------------------------------- PEFT's folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(path: str) -> tuple[str, dict]:
  """(file, float32 numpy tensors) of a PEFT adapter folder: its safetensors file, else
  the adapter_model.bin that older PEFT versions wrote."""
  import os  # pylint: disable=g-import-not-at-top
  weights = os.path.join(path, ADAPTER_WEIGHTS)
  if os.path.isfile(weights):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return weights, load_file(weights)
  weights = os.path.join(path, "adapter_model.bin")
  if os.path.isfile(weights):
    import torch  # pylint: disable=g-import-not-at-top
    return weights, {k: v.float().numpy() for k, v in
                     torch.load(weights, map_location="cpu", weights_only=True).items()}
  raise UserError(f"{path}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")


def is_peft_dir(path: str) -> bool:
  import os  # pylint: disable=g-import-not-at-top
  return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def pattern_value(patterns: dict, name: str, default):
  """A module's value in PEFT's rank_pattern or alpha_pattern: the first key that, as a
  regular expression, matches the end of its dotted name (peft's get_pattern_key)."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def read_peft(path: str, cfg) -> tuple[LoraConfig, dict, list[Site]]:
  """(config, adapters, sites) of a PEFT LoRA folder (adapter_config.json and
  adapter_model.safetensors or adapter_model.bin) over a base of config `cfg`.
  rank_pattern and alpha_pattern are resolved per module as PEFT does; the config keeps r and
  lora_alpha (one scale, alpha / r), and a module of another alpha or rank has its own
  scale folded into B (write_peft unfolds the rank's part again)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  conf_path = os.path.join(path, ADAPTER_CONFIG)
  if not os.path.isfile(conf_path):
    raise UserError(f"{conf_path} not found: give a PEFT adapter folder (adapter_config.json, "
                    f"{ADAPTER_WEIGHTS})")
  with open(conf_path, encoding="utf-8") as f:
    conf = json.load(f)
  kind = conf.get("peft_type")
  if kind != "LORA":
    raise UserError(f"{conf_path}: peft_type {kind!r}; flanjax reads LORA adapters here")
  for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
    if conf.get(key):
      raise UserError(f"{conf_path}: {key}=true is not supported by flanjax's LoRA")
  if conf.get("bias", "none") != "none" or conf.get("modules_to_save"):
    raise UserError(f"{conf_path}: adapters with trained biases or modules_to_save are not "
                    "supported (bias must be 'none')")
  weights, tensors = peft_tensors(path)
  adapters, chosen, rank = from_peft(tensors, cfg, weights)
  if len({site_rank(adapters, s) for s in chosen}) > 1 and isinstance(conf.get("r"), int):
    rank = conf["r"]  # ranks differ (rank_pattern): r, the pattern's default, is the run's
  alpha = float(conf.get("lora_alpha", 8))
  ranks, alphas = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
  for s in chosen:
    try:
      r = pattern_value(ranks, s.hf_name, conf.get("r"))
      own = float(pattern_value(alphas, s.hf_name, alpha))
    except re.error as e:
      raise UserError(f"{conf_path}: a rank_pattern or alpha_pattern key is not a valid "
                      f"regular expression ({e})") from None
    actual = site_rank(adapters, s)
    if r is not None and r != actual:
      raise UserError(f"{conf_path}: r={r} for {s.hf_name} (rank_pattern) but its weights "
                      f"have rank {actual}")
    # One scale alpha / rank for all modules: a module's own (PEFT's alpha_pattern and
    # rank_pattern: own / actual) goes into its B, so A B * scale is PEFT's product.
    if own / actual != alpha / rank and alpha > 0:  # alpha <= 0: LoraConfig refuses it below
      ab = _get(adapters, s.path)
      ab["b"] = ab["b"] * np.float32((own / actual) / (alpha / rank))
  targets = conf.get("target_modules")
  config = LoraConfig(rank=rank, alpha=alpha,
                      dropout=float(conf.get("lora_dropout") or 0.0),
                      targets=tuple(targets) if isinstance(targets, list) else targets)
  return config, adapters, chosen


def task_type(cfg) -> str:
  from flanjax.models.t5 import T5Config  # pylint: disable=g-import-not-at-top
  return "SEQ_2_SEQ_LM" if isinstance(cfg, T5Config) else "CAUSAL_LM"


def write_peft(path: str, config: LoraConfig, adapters, chosen: Sequence[Site], cfg,
               base_path: str | None = None) -> None:
  """adapter_config.json and adapter_model.safetensors as PEFT saves them."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  targets = config.targets
  if targets is None:
    targets = sorted({s.short for s in chosen})
  elif not isinstance(targets, str):
    targets = list(targets)
  # A module of another rank is scaled alpha / its rank by PEFT: its B carries the rest
  # of the run's scale alpha / rank.
  ranks = {s: site_rank(adapters, s) for s in chosen}
  other = {s: r for s, r in ranks.items() if r != config.rank}
  if other:
    adapters = jax.tree.map(lambda x: x, adapters)  # the caller's tree stays as it is
    for s, r in other.items():
      ab = _get(adapters, s.path)
      _set(adapters, s.path, {"a": ab["a"], "b": np.asarray(ab["b"]) * np.float32(
          r / config.rank)})
  conf = {"peft_type": "LORA", "task_type": task_type(cfg), "r": config.rank,
          "rank_pattern": {re.escape(s.hf_name): r for s, r in other.items()},
          "lora_alpha": config.alpha, "lora_dropout": config.dropout,
          "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "modules_to_save": None,
          "init_lora_weights": True, "inference_mode": True,
          "base_model_name_or_path": base_path}
  with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(conf, f, indent=1)
  save_file(to_peft(adapters, chosen), os.path.join(path, ADAPTER_WEIGHTS),
            metadata={"format": "pt"})
